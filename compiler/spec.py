"""Pass 1: the typed spec.

Every model is frozen and forbids unknown keys, at every level, so a typo is an error rather
than a silently ignored knob. Loading collects every problem and reports them all at once, each
with the file, the key path, what was found and what is allowed.

The learning objective (`objective`) and what the update may move (`parameterization`) are two
separate fields, validated separately: LoRA is a way to run SFT, not an alternative to it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from sftc.errors import SpecError
from sftc.yaml import load_yaml_text, read_yaml_file


# Ranges every later pass can honour. numpy and torch seeds are 0..2**32-1; the rest bound the work
# or memory that grows with a value (an order of MAX_PLANNED_ROWS int64 is 128 MiB) before it starts.
MAX_SEED = 2**32 - 1
MAX_SEQ_LENGTH = 1 << 20
MAX_BATCH = 1 << 16
MAX_PROCESSES = 1 << 16
MAX_LORA_RANK = 1 << 16
MAX_EPOCHS = 10_000.0
MAX_PLANNED_ROWS = 1 << 24
# A path or name from the spec reaches os calls: a NUL byte there is a ValueError, not a missing file.
PathText = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]
Name = Annotated[str, Field(min_length=1, max_length=1000, pattern=r"^[^\x00]+$")]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


def planned_rows_problem(steps: int, per_update: int, rows: int) -> str | None:
    """Why the data order a schedule asks for is too big to plan, or None. Checked before the order
    is built: `epochs: 1e15` or `batch.per_device: 10**9` would otherwise hang the compile."""
    planned = steps * per_update
    passes = -(-planned // max(rows, 1))  # the order is one seeded permutation per pass over the rows
    if planned <= MAX_PLANNED_ROWS and passes <= MAX_EPOCHS:
        return None
    return (f"schedule: {steps} optimizer steps x {per_update} rows per update = {planned} rows planned over "
            f"{rows} train rows ({passes} passes); at most {MAX_PLANNED_ROWS} rows and {MAX_EPOCHS:g} passes are "
            "planned in one bundle: lower schedule.epochs / schedule.max_steps or batch.per_device x grad_accum x "
            "world_size")


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` are valid YAML floats, and e.g. `schedule.epochs: .inf`
    # passed gt=0 and crashed the budget pass with OverflowError (found by tests/reliability).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- what the update may move --------------------------------------------------------------


class FullParameterization(Strict):
    """Every trainable weight may move."""

    kind: Literal["full"] = "full"


class LoraParameterization(Strict):
    """Low-rank adapters in the named layers; base weights stay frozen."""

    kind: Literal["lora"] = "lora"
    rank: int = Field(16, gt=0, le=MAX_LORA_RANK, description="LoRA rank r.")
    alpha: int = Field(32, gt=0, le=1_000_000, description="LoRA scaling alpha (effective scale alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: Union[Literal["all-linear"], Annotated[list[Name], Field(min_length=1, max_length=1000)]] = Field(
        "all-linear", description="'all-linear' (every linear layer but the output head) or module names."
    )
    merge_on_export: bool = Field(False, description="Also export base weights with the adapter merged in.")


class QuantizationConfig(Strict):
    """How the frozen base is stored for QLoRA (bitsandbytes)."""

    bits: Literal[4] = Field(4, description="Storage bits of the frozen base.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the 4-bit weights are dequantized to for matmuls."
    )


class QLoraParameterization(LoraParameterization):
    """LoRA adapters over a frozen base stored in 4-bit."""

    kind: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)


Parameterization = Annotated[
    Union[FullParameterization, LoraParameterization, QLoraParameterization], Field(discriminator="kind")
]


# --- inputs ----------------------------------------------------------------------------------


class ModelSpec(Strict):
    path: PathText = Field(description="Local model directory or hub id, loaded with from_pretrained.")
    revision: Name | None = Field(None, description="Hub revision (commit, tag or branch); recorded in the lock.")
    tokenizer: PathText | None = Field(None, description="Tokenizer directory or hub id; defaults to model.path.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Training dtype of the weights.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        "sdpa", description="Attention kernel; packed training is refused unless it honours example boundaries."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint. Off unless needed.")


Role = Literal["system", "user", "assistant"]


class OmitUnset(Strict):
    """Optional keys added after a record was first locked are left out of the dump while unset, so
    a spec (or lock part, sftc/lock.py) that does not use them keeps its canonical form and its id."""

    _omit_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        data = handler(self)
        for key in self._omit_when_none:
            if data.get(key, 0) is None:
                del data[key]
        return data


class FieldMap(OmitUnset):
    """Which row field holds what, and how rows as they ship map onto sftc's roles."""

    _omit_when_none = ("role", "content", "roles", "turn_markers")

    prompt: str = Field("prompt", description="Field with the user's request (prompt_completion).")
    completion: str = Field("completion", description="Field with the desired answer (prompt_completion).")
    messages: str = Field("messages", description="Field with the [{role, content}] list (conversational).")
    text: str = Field("text", description="Field with raw text (text format, continued pretraining).")
    group: str = Field(description="Group key for the leakage-resistant split: thread, policy document, tenant.")
    role: str | None = Field(None, description="Key of the speaker inside each message (ShareGPT/FastChat: 'from'); default 'role'.")
    content: str | None = Field(None, description="Key of the text inside each message (ShareGPT/FastChat: 'value'); default 'content'.")
    roles: dict[str, Role] | None = Field(
        None, description="Speaker names in the rows -> system / user / assistant (ShareGPT: {human: user, gpt: assistant}).",
    )
    turn_markers: dict[str, Role] | None = Field(
        None,
        description="prompt_completion: the prompt is a transcript cut into turns at these markers "
        "(OASST/Guanaco: {'### Human:': user, '### Assistant:': assistant}); the completion is the last answer.",
    )


class SourceSpec(OmitUnset):
    """One input of a mixture: files or a saved `datasets` dataset, with its own weight and mapping."""

    _omit_when_none = ("revision",)

    files: list[PathText] | None = Field(None, min_length=1, description="Input files: .jsonl, .json (a list of rows) or .parquet.")
    dataset: PathText | None = Field(
        None, description="Directory written by datasets' save_to_disk (read with load_from_disk), or a hub dataset "
        "id (org/name) already in the local Hugging Face cache (never downloaded).",
    )
    revision: str | None = Field(
        None, min_length=1, max_length=200, pattern=r"^[^\x00]+$",
        description="Hub dataset id only: branch, tag or commit of the cached snapshot (default main).",
    )
    split: str | None = Field(
        None, description="Split of a saved DatasetDict (e.g. 'train'), or of a hub dataset's files; required when "
        "it has several.",
    )
    weight: float = Field(
        1.0, gt=0.0, le=100.0,
        description="Share of this source's train examples used: 0.5 keeps a seeded half, 2.0 repeats each twice.",
    )
    format: Literal["prompt_completion", "conversational", "text"] | None = Field(
        None, description="Row shape of this source; default data.format."
    )
    fields: FieldMap | None = Field(None, description="Field map of this source; default data.fields.")

    @model_validator(mode="after")
    def _one_input(self) -> "SourceSpec":
        if (self.files is None) == (self.dataset is None):
            raise ValueError("give exactly one of files or dataset")
        if self.split is not None and self.dataset is None:
            raise ValueError("split applies to a dataset source")
        if self.revision is not None and self.dataset is None:
            raise ValueError("revision applies to a hub dataset source")
        return self


class DataSpec(OmitUnset):
    _omit_when_none = ("sources",)

    files: list[PathText] | None = Field(
        None, min_length=1, description="Input files: .jsonl, .json (a list of rows) or .parquet. Or use sources."
    )
    sources: list[SourceSpec] | None = Field(
        None, min_length=1, description="Weighted inputs (files or saved datasets), each with its own format and fields.",
    )
    format: Literal["prompt_completion", "conversational", "text"] = Field(
        description="Row shape. 'text' is for continued_pretraining."
    )
    fields: FieldMap
    max_reject_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Compile fails if more than this fraction of rows is rejected."
    )
    allow_control_tokens: bool = Field(
        False, description="Accept rows whose text holds a special/control token of the template (e.g. '<|user|>'); "
        "off: such a row could forge a turn, and is rejected as control_token_in_text.",
    )

    @model_validator(mode="after")
    def _one_input_list(self) -> "DataSpec":
        if (self.files is None) == (self.sources is None):
            raise ValueError("give exactly one of data.files or data.sources")
        formats = {source.format or self.format for source in self.sources or []}
        if "text" in formats | {self.format} and len(formats | {self.format}) > 1:
            raise ValueError(f"text sources cannot be mixed with chat sources (formats {sorted(formats | {self.format})})")
        return self


class SplitSpec(Strict):
    eval_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of groups held out (by group, never by row).")
    seed: int = Field(13, ge=0, le=MAX_SEED, description="Seed of the group hash that decides each group's side.")
    eval_groups: list[str] | None = Field(None, description="Explicit held-out groups; overrides eval_fraction.")
    normalize_group_keys: bool = Field(
        True, description="Group keys that differ only in case, whitespace or '_' / '-' are one group "
        "(every merge is listed in the lock's split record); false keeps keys exactly as written.",
    )
    near_duplicates: float | None = Field(
        0.85, gt=0.0, le=1.0,
        description="Prompts at least this similar (word-shingle Jaccard) are merged into one group; null turns it off.",
    )


class TemplateSpec(Strict):
    chat: PathText | None = Field(None, description="Chat template file (templates/chat/*.jinja); null uses the tokenizer's.")
    system: str | None = Field(None, max_length=100_000, description="System message prepended to every conversation.")
    terminator: str | None = Field(
        None, min_length=1, max_length=1000, description="End-of-turn string that must be supervised; default: detected from the template."
    )


class TokenizeSpec(Strict):
    max_length: int = Field(512, gt=8, le=MAX_SEQ_LENGTH, description="Tokens per example after templating; longer rows are truncated.")
    on_truncated_answer: Literal["reject", "error"] = Field(
        "reject", description="A row whose answer loses tokens to truncation is rejected and counted, or fails compile."
    )


class PackingSpec(Strict):
    strategy: Literal["none", "bfd", "bfd_split", "wrapped"] = Field(
        "bfd", description="TRL packing strategy; 'none' pads each example alone."
    )
    seq_length: int | None = Field(None, gt=8, le=MAX_SEQ_LENGTH, description="Packed row length; defaults to tokenize.max_length.")
    allow_mixing: bool = Field(
        False, description="Acknowledge that 'wrapped' lets one example read another; required for 'wrapped'."
    )


class BatchSpec(Strict):
    per_device: int = Field(4, gt=0, le=MAX_BATCH, description="Rows per device per micro-batch.")
    grad_accum: int = Field(1, gt=0, le=MAX_BATCH, description="Micro-batches accumulated per optimizer update.")
    world_size: int = Field(1, gt=0, le=MAX_PROCESSES, description="Data-parallel processes (nodes x processes per node).")

    @property
    def examples_per_update(self) -> int:
        return examples_per_update(self.per_device, self.grad_accum, self.world_size)


def examples_per_update(per_device: int, grad_accum: int, world_size: int) -> int:
    """Rows the optimizer sees per update. Packed rows differ in supervised tokens: track both."""
    return per_device * grad_accum * world_size


class OptimizerSpec(Strict):
    name: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor"
    ] = Field(
        "adamw_torch",
        description="Optimizer, passed to transformers as TrainingArguments.optim. Its state per trainable parameter "
        "(docs/memory.md): adamw_torch / _fused two moments in the parameter dtype; adamw_8bit / paged_adamw_8bit "
        "two 8-bit moments (bitsandbytes, blockwise); paged_adamw_32bit two float32 moments in paged memory; "
        "adafactor factored second moments only. The 8-bit and paged ones need bitsandbytes.",
    )
    lr: float = Field(gt=0.0, le=10.0, description="Peak learning rate. No default: choose it for the update surface.")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="Decoupled weight decay (recorded even when 0).")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0.0, le=1.0, description="Adam epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping norm; null disables.")


class ScheduleSpec(Strict):
    kind: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine", description="LR schedule.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    epochs: float | None = Field(None, gt=0.0, le=MAX_EPOCHS, description="Passes over the packed train rows.")
    max_steps: int | None = Field(None, gt=0, le=MAX_PLANNED_ROWS, description="Optimizer updates; overrides epochs.")

    @model_validator(mode="after")
    def _one_length(self) -> "ScheduleSpec":
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set schedule.epochs or schedule.max_steps")
        return self


class CheckpointSpec(Strict):
    every_steps: int = Field(50, gt=0, le=MAX_PLANNED_ROWS, description="Save (and evaluate) every N optimizer updates, and at the end.")
    keep_last: int = Field(3, gt=0, le=10_000, description="Checkpoints kept by rotation; the best is never deleted.")


class EvalSpec(Strict):
    rules: PathText | None = Field(None, description="Versioned rules file (format and policy checks, metric definitions).")
    max_new_tokens: int = Field(96, gt=0, le=32_768, description="Greedy generation budget per held-out prompt.")
    batch_size: int = Field(16, gt=0, le=MAX_BATCH, description="Prompts generated together (left-padded, KV cache on).")
    max_prompts: int | None = Field(None, gt=0, le=10_000_000, description="Cap on held-out prompts scored per evaluation.")


def _parsed_constraint(text: str) -> str:
    """The selector's own parser decides (runtime/select.py): `<= .` passed a regex here and then
    crashed the run at its first checkpoint."""
    from sftc.runtime.select import parse_constraint

    try:
        _, bound = parse_constraint(text)
    except ValueError:  # the selector's regex lets `<= .` through to float(); say what is allowed
        raise ValueError(f"constraint {text!r}: expected '<op> <number>' with op one of >=, <=, >, <, ==") from None
    if not math.isfinite(bound):
        raise ValueError(f"constraint {text!r}: the bound must be a finite number")
    return text


Constraint = Annotated[str, Field(max_length=100), AfterValidator(_parsed_constraint)]


class Objective(Strict):
    minimize: str | None = None
    maximize: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Objective":
        if (self.minimize is None) == (self.maximize is None):
            raise ValueError("give exactly one of minimize or maximize")
        return self


class SelectSpec(Strict):
    require: dict[str, Constraint] = Field(
        default_factory=dict, description="Constraints every candidate must meet, e.g. {format_pass_rate: '>= 0.98'}."
    )
    maximize: str | None = Field(None, description="Product metric to maximize among eligible checkpoints.")
    # The union is for the JSON schema only: a single mapping is accepted (and made a one-item
    # list by _single_to_list), so the schema must accept it too or editors flag valid specs.
    tie_break: Union[list[Objective], Objective] = Field(
        default_factory=lambda: [Objective(minimize="eval_loss")],
        description="Applied in order after the metric; one {minimize|maximize: metric} or a list of them.",
    )
    export_if_none_eligible: bool = Field(False, description="Export the best ineligible checkpoint anyway.")

    @field_validator("tie_break", mode="before")
    @classmethod
    def _single_to_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value


class VerifySpec(Strict):
    probe_examples: int = Field(4, ge=2, le=256, description="Held-out or train examples packed together in the contamination probe.")
    probe_tolerance: float = Field(1e-4, gt=0.0, description="Max |packed - isolated| per-example loss allowed.")


class DistributedSpec(Strict):
    """How several processes train one model (docs/distributed.md). The data each rank reads is
    fixed by the bundle's locked order whatever the engine."""

    # zero2 / zero3 stay in the Literal only so the spec check can refuse them with the FSDP2 equivalent
    strategy: Literal["none", "ddp", "fsdp", "zero2", "zero3"] = Field(
        "none",
        description="Data-parallel engine: 'none' (one process; plain DDP if launched with several), 'ddp', "
        "'fsdp' (PyTorch FSDP2: parameters, gradients and optimizer state sharded). 'zero2' / 'zero3' (DeepSpeed) "
        "are refused at compile: use 'fsdp'.",
    )
    nodes: int = Field(1, gt=0, le=MAX_PROCESSES, description="Machines.")
    procs_per_node: int = Field(1, gt=0, le=MAX_PROCESSES, description="Processes (devices) per machine.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Compute dtype under fsdp (weights and optimizer stay in model.dtype); fp16 needs CUDA."
    )
    cpu_offload: bool = Field(
        False, description="fsdp: keep sharded parameters and optimizer state in CPU memory (needs CUDA training)."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward instead of storing them."
    )


class TrackingSpec(Strict):
    """Where a run is watched. Not part of the bundle: trackers observe a run and never change its
    tokens, so canonical_spec leaves this section out of the lock and the bundle hash, and `sftc run`
    reads it from the spec file at run time (or from `--report-to`)."""

    report_to: list[Literal["tensorboard", "trackio", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Trackers, through Hugging Face's report_to (none by default).")
    project: str | None = Field(None, max_length=200, description="Tracker project (W&B / trackio / MLflow experiment).")
    run_name: str | None = Field(None, max_length=200, description="Tracker run name; default: the run directory's name.")
    progress_every_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="When output is not a terminal, one progress line every N steps "
        "(default: about 20 lines per run).")


class Spec(Strict):
    """A supervised fine-tuning run, declared. `sftc compile` turns it into a locked bundle."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="Run name; the bundle is <name>-<hash12>.")
    seed: int = Field(1234, ge=0, le=MAX_SEED, description="Seed of weights init, data order and dropout.")
    objective: Literal["sft", "continued_pretraining"] = Field(
        description="What signal to learn from: answers to prompts (sft) or next tokens of domain text."
    )
    parameterization: Parameterization = Field(description="What the update may move: full, lora or qlora.")
    model: ModelSpec
    data: DataSpec
    split: SplitSpec = Field(default_factory=SplitSpec)
    template: TemplateSpec = Field(default_factory=TemplateSpec)
    tokenize: TokenizeSpec = Field(default_factory=TokenizeSpec)
    packing: PackingSpec = Field(default_factory=PackingSpec)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    select: SelectSpec = Field(default_factory=SelectSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    # exclude=True: never serialized, so neither the lock nor the bundle hash ever holds it
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, exclude=True,
                                   description="Trackers and progress lines; not hashed (see TrackingSpec).")
    allow_external_paths: bool = Field(False, description="Let paths point outside the project (absolute or '..').")

    @property
    def seq_length(self) -> int:
        return self.packing.seq_length or self.tokenize.max_length


ZERO_STRATEGIES = ("zero2", "zero3")


def zero_refusal(strategy: str, cpu_offload: bool = False) -> str:
    """Why DeepSpeed ZeRO is refused and the spec lines that do the same with FSDP2 (docs/distributed.md).
    Shared by the compile check and the runtime's refusal of bundles compiled before it."""
    offload = ", cpu_offload: true" if cpu_offload else ""
    return (
        f"distributed.strategy: {strategy!r} (DeepSpeed ZeRO) is not supported: sftc does not drive DeepSpeed, so its "
        "sharding, loss scaling and checkpoints could not be verified, and such a bundle could only fail at run. "
        "PyTorch FSDP2 shards parameters, gradients and optimizer state as ZeRO-3 does (a superset of ZeRO-2), "
        f"verified rank by rank: set `distributed: {{strategy: fsdp{offload}}}` (mixed_precision, cpu_offload, "
        "activation_checkpointing, nodes and procs_per_node carry over unchanged)"
    )


def cross_field_problems(spec: Spec) -> list[str]:
    """Checks that involve more than one section. Each entry: 'key.path: what is wrong'."""
    problems = []
    if spec.objective == "continued_pretraining" and spec.data.format != "text":
        problems.append(
            f"data.format: continued_pretraining learns from raw text, found {spec.data.format!r}; allowed: 'text'"
        )
    if spec.objective == "sft" and spec.data.format == "text":
        problems.append("data.format: sft needs answers to supervise; 'text' is for objective continued_pretraining")
    if spec.packing.strategy == "wrapped" and not spec.packing.allow_mixing:
        problems.append(
            "packing.strategy: 'wrapped' cuts examples and lets one read another; "
            "set packing.allow_mixing: true to acknowledge it, or use 'bfd' / 'bfd_split'"
        )
    if spec.parameterization.kind == "qlora":
        from importlib import metadata

        try:  # the installed distribution, not find_spec: commands that never quantize hide the module (sftc/quiet.py)
            metadata.version("bitsandbytes")
        except metadata.PackageNotFoundError:
            problems.append("parameterization.kind: qlora needs bitsandbytes; install sftc[qlora]")
        if spec.model.dtype == "float16" and spec.parameterization.quantization.compute_dtype == "float32":
            problems.append("parameterization.quantization.compute_dtype: float32 compute with float16 weights is unsupported")
    if spec.optimizer.name in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        from importlib import metadata

        try:  # as for qlora: the installed distribution
            metadata.version("bitsandbytes")
        except metadata.PackageNotFoundError:
            problems.append(f"optimizer.name: {spec.optimizer.name!r} is a bitsandbytes optimizer; install sftc[qlora], "
                            "or use adamw_torch, adamw_torch_fused or adafactor")
    world = spec.distributed.nodes * spec.distributed.procs_per_node
    dist = spec.distributed
    if dist.strategy in ZERO_STRATEGIES:
        problems.append(zero_refusal(dist.strategy, dist.cpu_offload))
    elif dist.cpu_offload and dist.strategy != "fsdp":
        problems.append(f"distributed.cpu_offload: offloads sharded state; needs strategy fsdp, found {dist.strategy!r}")
    if dist.mixed_precision != "no" and dist.strategy not in ("fsdp", *ZERO_STRATEGIES):
        problems.append(
            f"distributed.mixed_precision: applies to strategy fsdp, found {dist.strategy!r}; "
            "for ddp / none set model.dtype"
        )
    if dist.mixed_precision != "no" and spec.model.dtype != "float32":
        problems.append(
            f"distributed.mixed_precision: {dist.mixed_precision!r} with model.dtype {spec.model.dtype!r}; "
            "mixed precision keeps float32 weights, set model.dtype: float32"
        )
    if world != spec.batch.world_size:
        problems.append(
            f"batch.world_size: {spec.batch.world_size} but distributed.nodes x procs_per_node = {world}; make them agree"
        )
    behaviour = [k for k in _select_metrics(spec) if k != "eval_loss"]
    if behaviour and spec.eval.rules is None:
        problems.append(f"eval.rules: select uses {behaviour} but no rules file declares them")
    return problems


def undeclared_select_metrics(spec: Spec, declared, written_by_runtime) -> list[str]:
    """select keys no evaluation will ever report: every checkpoint would be ineligible, found only
    after the whole run. Each entry: 'key.path: what is wrong'."""
    known = set(declared) | set(written_by_runtime) | {"val_loss"}  # val_loss: the selector's alias of eval_loss
    problems = []
    for key, names in (("select.require", list(spec.select.require)),
                       ("select.maximize", [spec.select.maximize] if spec.select.maximize else []),
                       ("select.tie_break", [o.minimize or o.maximize for o in spec.select.tie_break])):
        for name in names:
            if name not in known:
                problems.append(f"{key}: {name!r} is not a metric of the rules file nor of the runtime; "
                                f"allowed: {', '.join(sorted(set(declared) | {'eval_loss'}))}")
    return problems


def _select_metrics(spec: Spec) -> list[str]:
    names = list(spec.select.require) + ([spec.select.maximize] if spec.select.maximize else [])
    names += [o.minimize or o.maximize for o in spec.select.tie_break]
    return names


# --- loading ---------------------------------------------------------------------------------


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at `loc` (for listing allowed keys)."""
    model: Any = Spec
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        if part in ("full", "lora", "qlora"):  # discriminator tag in the error location
            model = {"full": FullParameterization, "lora": LoraParameterization, "qlora": QLoraParameterization}[part]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None and part == "parameterization":
            model = LoraParameterization
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in loc if p not in ("full", "lora", "qlora")) or "(top level)"
    found = error.get("input")
    shown = repr(found)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc)
        allowed = ", ".join(sorted(owner.model_fields)) if owner else "see `sftc schema`"
        return f"{path}: unknown key; allowed keys here: {allowed}"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    return f"{path}: {error['msg']} (found {shown})"


def parse_spec(raw: Any, source: str = "<spec>") -> Spec:
    """Validate a mapping as a Spec; every problem is reported at once."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping, found {type(raw).__name__}")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise SpecError(f"{source}: {len(problems)} problem(s) in the spec", [f"{source}: {p}" for p in problems]) from None
    problems = cross_field_problems(spec)
    if problems:
        raise SpecError(f"{source}: {len(problems)} problem(s) in the spec", [f"{source}: {p}" for p in problems])
    return spec


def load_spec_text(text: str, source: str) -> Spec:
    return parse_spec(load_yaml_text(text, source, "spec", SpecError), source)


def load_spec(path: str | os.PathLike) -> Spec:
    raw = read_yaml_file(path, "spec file", SpecError)
    return parse_spec(raw, str(path))


def canonical_spec(spec: Spec) -> dict:
    """The spec with every default filled in: what the lock records and the bundle hash covers.
    `tracking` is left out: it watches the run and never changes its tokens (TrackingSpec)."""
    return spec.model_dump(mode="json", exclude={"tracking"})


def json_schema() -> dict:
    return Spec.model_json_schema()


# --- paths -----------------------------------------------------------------------------------

ROOT_MARKERS = ("pyproject.toml", "dvc.yaml", ".git")


def project_root(spec_path: str | os.PathLike) -> Path:
    """Relative paths in a spec are relative to the project that holds it."""
    start = Path(spec_path).resolve().parent
    for candidate in (start, *start.parents):
        if any((candidate / m).exists() for m in ROOT_MARKERS):
            return candidate
    return start


MAX_DIRECTORY_ENTRIES = 100_000


def refuse_links_out(root: Path, directory: Path, key: str, spec: Spec, source: str) -> None:
    """A project directory (the model's, the tokenizer's) whose files are symlinks out of the project
    is refused like a path out of it: resolve_path checks the directory, this its contents."""
    project = root.resolve()
    try:
        Path(directory).resolve().relative_to(project)
    except ValueError:
        return  # a hub snapshot or an allowed external path: not a project directory
    if spec.allow_external_paths:
        return
    outside, seen = [], 0
    for parent, dirs, files in os.walk(directory, followlinks=False):
        for name in [*dirs, *files]:
            seen += 1
            if seen > MAX_DIRECTORY_ENTRIES:
                raise SpecError(f"{source}: {key}: {directory} holds more than {MAX_DIRECTORY_ENTRIES} entries; refused")
            entry = Path(parent) / name
            if entry.is_symlink():
                try:
                    entry.resolve().relative_to(project)
                except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop
                    outside.append(entry.relative_to(directory).as_posix())
    if outside:
        raise SpecError(
            f"{source}: {key}: {len(outside)} file(s) in {Path(directory).name}/ are symlinks that leave the project; "
            "copy them in, or set allow_external_paths: true", [f"{name} -> outside the project" for name in sorted(outside)[:20]],
        )


def resolve_path(root: Path, value: str, key: str, spec: Spec, source: str) -> Path:
    """A spec path, resolved; refused if it leaves the project unless the spec allows it."""
    candidate = Path(value)
    resolved = (root / candidate).resolve() if not candidate.is_absolute() else candidate.resolve()
    if not spec.allow_external_paths:
        try:
            resolved.relative_to(root.resolve())
        except ValueError:
            raise SpecError(
                f"{source}: {key}: path {value!r} leaves the project ({root}); "
                "use a path inside it, or set allow_external_paths: true"
            ) from None
    return resolved
