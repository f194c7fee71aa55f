"""Architecture conversion of a stage's start model (docs/CONVERSION.md).

* MHA -> GQA (Ainslie et al. 2023): key/value heads are mean-pooled in consecutive groups; query head h keeps
  reading group h // (num_attention_heads / G), which is how transformers maps query heads to kv heads.
* Dense -> MoE sparse upcycling (Komatsuzaki et al. 2023): a Llama/Mistral model becomes a Mixtral model whose E
  experts are copies of the dense MLP and whose router is new. Mixtral normalises the top-k routing weights to sum
  to 1, so identical experts reproduce the dense output up to float rounding, whatever the router says.

Both build a fresh transformers model from the converted config and load a mapped state dict into it, so the result
is a plain transformers model that `save_pretrained` exports and `AutoModelForCausalLM` loads back.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig, PretrainedConfig, PreTrainedModel

from midtrain.config import ConvertConfig
from midtrain.model.attention import DocumentSegments, per_document_plan
from midtrain.model.hf import build_model, unwrap_model

# Families whose attention is q/k/v/o projections with kv heads mapped as h // (H / kv) (transformers' repeat_kv).
GQA_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "mixtral"})
# Dense families whose blocks are exactly Mixtral's minus the MoE (no biases, gate/up/down SwiGLU MLP).
MOE_FAMILIES = frozenset({"llama", "mistral"})
_KV_KEY = re.compile(r"\.self_attn\.[kv]_proj\.(weight|bias)$")
_MLP_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass
class ConversionReport:
    """What a conversion did: `changed` parameters (new name or new shape) restart their optimizer state."""

    kind: str
    changed: list[str] = field(default_factory=list)
    drift: dict[str, float] = field(default_factory=dict)  # see `logit_drift`; empty when no probe was given

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- checks (no weights needed)


def _kv_heads(config: PretrainedConfig) -> int:
    return config.num_key_value_heads or config.num_attention_heads


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gqa_problems(config: PretrainedConfig, num_key_value_heads: int) -> list[str]:
    """Why `config` cannot be pooled to `num_key_value_heads` kv heads (empty when it can)."""
    if config.model_type not in GQA_FAMILIES:
        return [f"GQA conversion supports {sorted(GQA_FAMILIES)} models (got {config.model_type!r})"]
    heads, kv, g = config.num_attention_heads, _kv_heads(config), num_key_value_heads
    problems = []
    if g < 1 or heads % g:
        problems.append(f"num_key_value_heads must divide num_attention_heads ({heads}), got {g}")
    if g > kv:
        problems.append(f"num_key_value_heads {g} exceeds the model's {kv} kv heads (pooling only removes heads)")
    elif g >= 1 and kv % g:
        problems.append(f"num_key_value_heads must divide the model's current num_key_value_heads ({kv}): "
                        f"heads are mean-pooled in equal groups, got {g}")
    return problems


def moe_problems(config: PretrainedConfig, num_experts: int, top_k: int) -> list[str]:
    """Why `config` cannot be upcycled to a Mixtral with `num_experts` experts and `top_k` routing."""
    if config.model_type not in MOE_FAMILIES:
        return [f"MoE upcycling turns {sorted(MOE_FAMILIES)} models into Mixtral (got {config.model_type!r})"]
    problems = []
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            problems.append(f"{flag}=true: Mixtral has no projection biases, the upcycled model could not match")
    if not 1 <= top_k <= num_experts:
        problems.append(f"top_k must lie in [1, num_experts={num_experts}], got {top_k}")
    return problems


def conversion_problems(config: PretrainedConfig, spec: ConvertConfig) -> list[str]:
    if spec.kind == "gqa":
        return gqa_problems(config, spec.num_key_value_heads)
    return moe_problems(config, spec.num_experts, spec.top_k)


def converted_config(config: PretrainedConfig, spec: ConvertConfig) -> PretrainedConfig:
    """The config of the model `spec` turns `config` into (validate with `conversion_problems` first)."""
    if spec.kind == "gqa":
        new = copy.deepcopy(config)
        new.num_key_value_heads = spec.num_key_value_heads
        return new
    return _mixtral_config(config, spec)


def recipe_conversion_problems(recipe: Any, base_config: PretrainedConfig) -> list[str]:
    """Every stage's `convert` against the config its start model will have (earlier conversions applied)."""
    problems, config = [], base_config
    for i, stage in enumerate(recipe.stages):
        if i > 0 and recipe.stage_init(i) == "scratch":
            config = base_config
        if stage.convert is None:
            continue
        found = conversion_problems(config, stage.convert)
        problems += [f"stages.{stage.name}.convert: {msg}" for msg in found]
        if not found:
            config = converted_config(config, stage.convert)
    return problems


def _mixtral_config(config: PretrainedConfig, spec: ConvertConfig) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=_kv_heads(config),
        head_dim=_head_dim(config),
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=copy.deepcopy(config.rope_parameters),
        sliding_window=getattr(config, "sliding_window", None),
        attention_dropout=config.attention_dropout,
        num_local_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        router_aux_loss_coef=spec.router_aux_loss_coef,
        router_jitter_noise=0.0,  # multiplicative input noise would break the exact dense start
        output_router_logits=False,  # the trainer collects router logits itself (see `with_router_aux_loss`)
        use_cache=False,
    )


# --------------------------------------------------------------------------- conversions


def mean_pool_heads(weight: torch.Tensor, old_heads: int, new_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of `weight` ([old_heads * head_dim, ...], head-major) averaged over consecutive groups of heads."""
    group = old_heads // new_heads
    rest = weight.shape[1:]
    return weight.reshape(new_heads, group, head_dim, *rest).mean(dim=1).reshape(new_heads * head_dim, *rest)


def convert_gqa(
    model: PreTrainedModel, num_key_value_heads: int, *, seed: int = 0
) -> tuple[PreTrainedModel, list[str]]:
    """A copy of `model` with `num_key_value_heads` kv heads, each the mean of a group of the current ones.

    Returns the new model and the names of the parameters that changed (none when the head count is unchanged).
    """
    config = model.config
    problems = gqa_problems(config, num_key_value_heads)
    if problems:
        raise ValueError("; ".join(problems))
    old, head_dim = _kv_heads(config), _head_dim(config)
    state, changed = {}, []
    for name, tensor in model.state_dict().items():
        if _KV_KEY.search(name) and num_key_value_heads != old:
            tensor = mean_pool_heads(tensor, old, num_key_value_heads, head_dim)
            changed.append(name)
        state[name] = tensor
    spec = ConvertConfig(kind="gqa", num_key_value_heads=num_key_value_heads)
    new = _fresh_like(model, converted_config(config, spec), seed)
    _load_exact(new, state)
    return new, changed


def upcycle_moe(
    model: PreTrainedModel,
    num_experts: int,
    top_k: int,
    *,
    router_aux_loss_coef: float = 0.01,
    router_init: str = "normal",
    router_init_std: float | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, list[str]]:
    """A Mixtral model whose experts are copies of `model`'s MLPs; attention, norms, embeddings copied as they are.

    The router is N(0, std²) (std: `router_init_std`, default the config's initializer_range; seeded) or zeros.
    Returns the new model and the names of its new parameters (experts and routers).
    """
    spec = ConvertConfig(kind="moe", num_experts=num_experts, top_k=top_k, router_aux_loss_coef=router_aux_loss_coef,
                      router_init=router_init, router_init_std=router_init_std)
    problems = moe_problems(model.config, num_experts, top_k)
    if problems:
        raise ValueError("; ".join(problems))
    new = _fresh_like(model, converted_config(model.config, spec), seed)
    mlp: dict[int, dict[str, torch.Tensor]] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        match = _MLP_KEY.match(name)
        if match:
            mlp.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        else:
            state[name] = tensor
    generator = torch.Generator().manual_seed(seed)
    std = router_init_std if router_init_std is not None else model.config.initializer_range
    changed = []
    for layer, w in sorted(mlp.items()):
        prefix = f"model.layers.{layer}.mlp"
        # transformers 5 stores Mixtral experts fused: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
        gate_up = torch.cat([w["gate_proj"], w["up_proj"]], dim=0)
        state[f"{prefix}.experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(num_experts, 1, 1)
        state[f"{prefix}.experts.down_proj"] = w["down_proj"].unsqueeze(0).repeat(num_experts, 1, 1)
        router = torch.zeros(num_experts, model.config.hidden_size)
        if router_init == "normal":
            router.normal_(0.0, std, generator=generator)
        state[f"{prefix}.gate.weight"] = router.to(gate_up.dtype)
        changed += [f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj", f"{prefix}.gate.weight"]
    _load_exact(new, state)
    return new, changed


def convert_model(
    model: PreTrainedModel, spec: ConvertConfig, *, seed: int = 0, probe: dict[str, torch.Tensor] | None = None
) -> tuple[PreTrainedModel, ConversionReport]:
    """Apply a recipe's `convert` setting; with a `probe` batch (input_ids, optional labels) also measure drift."""
    if spec.kind == "gqa":
        new, changed = convert_gqa(model, spec.num_key_value_heads, seed=seed)
    else:
        new, changed = upcycle_moe(model, spec.num_experts, spec.top_k, router_aux_loss_coef=spec.router_aux_loss_coef,
                                   router_init=spec.router_init, router_init_std=spec.router_init_std, seed=seed)
    report = ConversionReport(kind=spec.kind, changed=changed)
    if probe is not None:
        report.drift = logit_drift(model, new, probe)
    return new, report


def converted_skeleton(model: PreTrainedModel, spec: ConvertConfig, *, seed: int = 0) -> PreTrainedModel:
    """The converted architecture with fresh weights: a resumed stage loads its own checkpoint into it instead of
    converting again."""
    return _fresh_like(model, converted_config(model.config, spec), seed)


def _fresh_like(model: PreTrainedModel, config: PretrainedConfig, seed: int) -> PreTrainedModel:
    new = build_model(config, seed, attn_implementation=model.config._attn_implementation)
    return new.to(next(model.parameters()).device)


def _load_exact(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """Load `state` and insist that every tensor is used and every parameter is set (a transformers layout change
    must fail loudly here, not train a half-random model)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"converted state does not fit {type(model).__name__}: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, shape mismatch {sorted(wrong)[:4]} (transformers layout changed?)"
        )
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- drift


@torch.no_grad()
def logit_drift(before: nn.Module, after: nn.Module, probe: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far `after`'s outputs moved from `before`'s on `probe` (input_ids, optional position_ids/labels).

    rel_logits_error = ||Δlogits||_F / ||logits||_F; max_abs_logits_error; loss_before/loss_after/loss_delta are the
    mean next-token cross-entropy (labels default to input_ids).
    """
    from midtrain.model.attention import forward_packed

    batch = dict(probe)
    batch.setdefault("position_ids", torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    labels = batch.get("labels", batch["input_ids"])
    out = {}
    logits = {}
    for name, model in (("before", before), ("after", after)):
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        logits[name] = forward_packed(model, {k: v.to(device) for k, v in batch.items()}).float().cpu()
        model.train(was_training)
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
        out[f"loss_{name}"] = float(F.cross_entropy(logits[name].flatten(0, 1), shifted.flatten(), ignore_index=-100))
    diff = logits["after"] - logits["before"]
    out["rel_logits_error"] = float(diff.norm() / logits["before"].norm().clamp_min(1e-30))
    out["max_abs_logits_error"] = float(diff.abs().max())
    out["loss_delta"] = out["loss_after"] - out["loss_before"]
    return out


# --------------------------------------------------------------------------- training: router auxiliary loss


@dataclass
class _RouterSpec:
    router_class: type
    index: int
    num_experts: int
    top_k: int
    coef: float


def _router_spec(model: PreTrainedModel) -> _RouterSpec | None:
    """How a transformers MoE model exposes its router logits (None for a dense model)."""
    recorder = getattr(model, "_can_record_outputs", None) or {}
    rec = recorder.get("router_logits")
    config = model.config
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if rec is None or not num_experts:
        return None
    return _RouterSpec(rec.target_class, rec.index, num_experts, config.num_experts_per_tok,
                       float(getattr(config, "router_aux_loss_coef", 0.0)))


class _RouterLogits:
    """Forward hooks on every router that, while recording, collect its logits [tokens, experts]."""

    def __init__(self, model: nn.Module, spec: _RouterSpec):
        self.spec, self.active, self.logits = spec, False, []
        for module in model.modules():
            if isinstance(module, spec.router_class):
                module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.active:
            self.logits.append(output[self.spec.index] if isinstance(output, tuple) else output)

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        self.active, self.logits = True, []
        try:
            yield self.logits
        finally:
            self.active = False


def with_router_aux_loss(
    model: nn.Module, forward: Callable[[nn.Module, dict], torch.Tensor]
) -> Callable[[nn.Module, dict], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """`forward` itself for a dense model (zero cost); for an MoE model a forward returning (logits, aux loss).

    The aux loss is `router_aux_loss_coef` x transformers' Switch-style load-balancing loss over all layers' routers,
    counting real tokens only (padding: source id -1). We collect router logits with hooks instead of asking the
    model for `aux_loss`, because transformers feeds the attention mask to that loss and a packed batch's mask is 4D.
    """
    inner = unwrap_model(model)
    spec = _router_spec(inner)
    if spec is None:
        return forward
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    routers = _RouterLogits(inner, spec)

    def forward_with_aux(m: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with routers.recording() as collected:
            logits = forward(m, batch)
        mask = (batch["source_ids"] >= 0) if "source_ids" in batch else None
        gate_logits = tuple(collected)
        tokens = batch["input_ids"].numel()
        if collected and collected[0].shape[0] != tokens:  # documents run alone: regroup by layer, in plan order
            gate_logits, mask = _router_logits_per_layer(collected, per_document_plan(batch["position_ids"]), mask)
        aux = load_balancing_loss_func(gate_logits, spec.num_experts, spec.top_k, mask)
        return logits, spec.coef * aux

    return forward_with_aux


def _router_logits_per_layer(
    collected: list[torch.Tensor], plan: DocumentSegments, mask: torch.Tensor | None
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Router logits of a per-document forward (`forward_packed` for recurrent families: one call per group of
    `plan`, each call recording every MoE layer) as one [tokens, experts] tensor per layer without the padding
    rows, and the token mask reordered to match (load_balancing_loss_func pairs them position by position)."""
    calls = len(plan.counts)
    layers = len(collected) // calls
    keep = torch.ones(int(plan.gather.numel()), dtype=torch.bool, device=plan.gather.device)
    keep[plan.padding] = False
    per_layer = tuple(torch.cat(collected[layer::layers])[keep] for layer in range(layers))
    if mask is not None:
        mask = mask.reshape(-1)[plan.gather[keep]].view(1, -1)
    return per_layer, mask


def load_optimizer_except_changed(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Load a pre-conversion optimizer state: parameters whose name or shape changed start fresh (no state, as in
    a new AdamW); the rest keep their moments. Returns the names that start fresh."""
    from torch.distributed import is_initialized
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    saved = torch.load(path, map_location="cpu", weights_only=False)
    shapes = {name: tuple(p.shape) for name, p in unwrap_model(model).named_parameters()}
    kept = {}
    for name, entry in saved["state"].items():
        avg = entry.get("exp_avg")
        if name in shapes and (avg is None or tuple(avg.shape) == shapes[name]):
            kept[name] = entry
    fresh = sorted(set(shapes) - set(kept))
    options = StateDictOptions(full_state_dict=is_initialized(), cpu_offload=is_initialized(), strict=False)
    set_optimizer_state_dict(model, optimizer, {"state": kept, "param_groups": saved["param_groups"]},
                             options=options)
    return fresh


def describe(report: ConversionReport) -> str:
    """One line for the console."""
    d = report.drift
    drift = (f"; drift on the held-out probe: relative logits error {d['rel_logits_error']:.3g}, "
             f"loss {d['loss_before']:.4f} -> {d['loss_after']:.4f}") if d else ""
    n = len(report.changed)
    return f"converted ({report.kind}): {n} parameter tensor{'s' * (n != 1)} changed{drift}"
