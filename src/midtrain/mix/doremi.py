"""`midtrain mix doremi`: DoReMi (Xie et al. 2023) domain weights for one stage of a recipe.

1. **Reference.** The stage at the proxy budget on the reference mixture (uniform over the stage's sources, the
   paper's default, or the recipe's own weights), trained by the real run machinery as `mix search` trains its
   proxies, its export kept for step 2.
2. **Group-DRO proxy.** The same start and budget, batches drawn from the reference mixture. Each step, with the
   proxy's per-token losses l and the reference's r on the batch:
     excess_i = mean over source i's tokens of max(l - r, 0)                 (per-domain excess loss)
     alpha    = (1 - c) * normalise(alpha_prev * exp(eta * excess)) + c / k (exponentiated gradient, smoothed)
     the proxy steps on  sum_i alpha_i * (mean of l over source i's tokens)  (the reweighted objective)
   with alpha starting uniform, eta = 1 and c = 1e-3 as in the paper (Algorithm 1). A source absent from a step's
   batch keeps its weight (no evidence either way); the present ones share the rest.
3. The result is alpha averaged over the steps: the mixture for the target run (`best_mixture.yaml`).
4. `--verify-seeds`: the DoReMi, recipe and uniform mixtures each trained as the stage itself (its own tokens, from
   its start) per seed, with the target metric measured: the weights are for the target run, not for the proxy.

Domains are the stage's sources (the mixture's keys; `replay` is folded in first, as `mix search` does). The proxy
runs in one process and holds one step's activations (its batches are the stage's); it keeps no checkpoints: one
stopped half-way trains again, while the reference and the verification runs resume like any proxy.

Directory: OUT/doremi.json (settings), OUT/reference/ (a proxy dir), OUT/proxy/{recipe.yaml, log.txt,
weights.jsonl, result.json}, OUT/verify/<mixture>-seed<s>/, OUT/summary.json, OUT/best_mixture.yaml.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midtrain.config import Recipe, load_recipe
from midtrain.io import write_json_atomic, write_text_atomic
from midtrain.layout import ProxyLayout
from midtrain.mix.proxy import MixError, MixRunError, Proxy, derive_recipe, run_proxies
from midtrain.mix.search import check_settings, conclude, method_setup
from midtrain.model.loss import token_losses
from midtrain.plan import build_plan

REFERENCES = ("uniform", "recipe")
# Settings that change what the reference and the proxy train: doremi.json records them, a re-run must agree.
PROXY_KEYS = ("stage", "tokens", "reference", "step_size", "smoothing", "start")


@dataclass(frozen=True)
class DoremiConfig:
    stage: str
    tokens: int | None = None  # the reference's and the proxy's budget each; None = the stage's own tokens
    reference: str = "uniform"  # the reference model's mixture, which the proxy's batches are also drawn from
    step_size: float = 1.0  # eta of the exponentiated-gradient update (the paper's 1)
    smoothing: float = 1e-3  # c: the share of uniform mixed into the weights each step (the paper's 1e-3)
    start: str | None = None  # what the reference and proxy start from; None = the stage's own start
    target: str = "loss"  # the metric --verify-seeds measures
    verify_seeds: tuple[int, ...] = ()
    workers: int = 1
    threads: int | None = None
    keep_models: bool = False

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise MixError(f"--reference {self.reference!r}: choose {' or '.join(REFERENCES)}")
        if not (np.isfinite(self.step_size) and self.step_size > 0):
            raise MixError(f"--step-size {self.step_size}: must be > 0")
        if not 0 <= self.smoothing <= 1:
            raise MixError(f"--smoothing {self.smoothing}: a fraction in [0, 1]")
        if self.workers < 1:
            raise MixError(f"--workers {self.workers}: must be >= 1")


# --------------------------------------------------------------------------- Group DRO


def domain_excess(losses: torch.Tensor, reference: torch.Tensor, sources: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over each source's tokens of max(losses - reference, 0), token count per source), both [k] float64.
    `sources` is -1 where no token is predicted (those positions count nowhere)."""
    keep = sources >= 0
    clipped = (losses.detach().double() - reference.double()).clamp(min=0)[keep]
    idx = sources[keep].long()
    sums = torch.zeros(k, dtype=torch.float64, device=losses.device).index_add_(0, idx, clipped)
    counts = torch.zeros(k, dtype=torch.float64, device=losses.device).index_add_(0, idx, torch.ones_like(clipped))
    return sums, counts


def group_dro_update(weights: np.ndarray, excess: np.ndarray, step_size: float, smoothing: float,
                     present: np.ndarray | None = None) -> np.ndarray:
    """One DoReMi step: weights * exp(step_size * excess), renormalised, then (1 - smoothing) of it plus smoothing
    of uniform. Computed in log space (a large excess cannot overflow). A source not `present` in the step's batch
    gives no evidence: it keeps its share, and the present ones share the rest (with small batches a long-document
    source is often absent, and an excess of 0 would shrink it for no reason)."""
    weights, excess = np.asarray(weights, dtype=np.float64), np.asarray(excess, dtype=np.float64)
    present = np.ones(weights.size, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    updated = weights.copy()
    if present.any():
        logits = np.log(weights[present]) + step_size * excess[present]
        scaled = np.exp(logits - logits.max())
        updated[present] = weights[present].sum() * scaled / scaled.sum()
    updated /= updated.sum()
    return (1 - smoothing) * updated + smoothing / weights.size


def dro_objective(losses: torch.Tensor, sources: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor
                  ) -> torch.Tensor:
    """sum_i weights_i * (sum of source i's token losses here) / counts_i: summed over a step's micro-batches with
    the step's per-source `counts`, it is the weighted mean of the per-source mean losses."""
    keep = sources >= 0
    idx = sources[keep].long()
    per_token = (weights / counts.clamp(min=1)).to(losses.dtype)[idx]
    return (losses[keep] * per_token).sum()


# --------------------------------------------------------------------------- the proxy


def train_dro_proxy(proxy: Proxy, reference_export: Path, *, step_size: float, smoothing: float,
                    threads: int | None = None) -> dict[str, Any]:
    """Trains the Group-DRO proxy in `proxy.dir` against the reference export; writes weights.jsonl (per step) and
    result.json (last, atomically: a proxy with a result is never trained again)."""
    from midtrain.model import forward_packed, load_model
    from midtrain.model.families import choose_attention
    from midtrain.run import RunOptions
    from midtrain.run.context import RunContext
    from midtrain.run.setup import initial_model, make_loader, resolve_tokenizer, tokenize_all
    from midtrain.train.distributed import init_distributed
    from midtrain.train.optim import build_optimizer, set_lr
    from midtrain.train.precision import resolve_precision

    files = ProxyLayout(proxy.dir)
    if files.result.is_file():
        return json.loads(files.result.read_text())
    proxy.prepare()
    recipe = load_recipe(files.recipe)
    plan = build_plan(recipe)
    stage, stage_cfg = plan.stages[0], recipe.stages[0]
    dist = init_distributed("none")  # one process: the proxy is small (a launcher's WORLD_SIZE > 1 is refused)
    device = dist.device
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    try:
        tokenizer = resolve_tokenizer(recipe)
        sources = tokenize_all(recipe, tokenizer, dist, files.run.data)
        precision = resolve_precision(recipe.precision, device)
        ctx = RunContext(recipe, plan, dist, files.run, tokenizer, sources, [s.domain_name for s in recipe.sources],
                         RunOptions(progress=False), precision)
        torch.manual_seed(recipe.seed)
        model = initial_model(ctx, stage).to(device).train()
        reference = load_model(reference_export, trust_remote_code=recipe.trust_remote_code).to(device).eval()
        reference.set_attn_implementation(choose_attention(reference.config, recipe.attention).implementation)
        reference.config.use_cache = False
        optimizer = build_optimizer(model, stage_cfg.optimizer, lr=stage.lr_at_step(0))
        loader, used = make_loader(ctx, stage, ctx.target(stage))
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
        names = [recipe.sources[i].name for i in used]
        k = len(names)
        weights = np.full(k, 1.0 / k)
        total = np.zeros(k)
        rows = []
        for step in range(stage.steps):
            set_lr(optimizer, stage.lr_at_step(step))
            excess = torch.zeros(k, dtype=torch.float64, device=device)
            counts = torch.zeros(k, dtype=torch.float64, device=device)
            step_losses = []
            for mb in loader.next_step():
                mb = {key: v.to(device) for key, v in mb.items()}
                with autocast:
                    losses, src = token_losses(forward_packed(model, mb), mb["labels"], mb["source_ids"])
                    with torch.no_grad():
                        ref_losses, _ = token_losses(forward_packed(reference, mb), mb["labels"], mb["source_ids"])
                sums, n = domain_excess(losses, ref_losses, src, k)
                excess, counts = excess + sums, counts + n
                step_losses.append((losses, src))
            mean_excess = (excess / counts.clamp(min=1)).cpu().numpy()  # one device sync per step
            weights = group_dro_update(weights, mean_excess, step_size, smoothing, present=(counts > 0).cpu().numpy())
            w = torch.tensor(weights, dtype=torch.float32, device=device)
            objective = sum(dro_objective(losses, src, w, counts) for losses, src in step_losses)
            objective.backward()
            if stage_cfg.optimizer.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), stage_cfg.optimizer.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += weights
            rows.append({"step": step + 1, "weights": dict(zip(names, weights.tolist())),
                         "excess": {n: e for n, e, c in zip(names, mean_excess.tolist(), counts.cpu().tolist())
                                    if c > 0},
                         "objective": float(objective.detach())})
    except (OSError, ValueError, RuntimeError) as exc:
        raise MixRunError(f"DoReMi proxy {proxy.dir} failed: {exc}") from None
    finally:
        torch.set_num_threads(previous_threads)
    write_text_atomic(proxy.dir / "weights.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    result = {"sources": names, "average": dict(zip(names, (total / stage.steps).tolist())),
              "final": dict(zip(names, weights.tolist())), "steps": stage.steps,
              "tokens": stage.steps * stage.batch_tokens, "seed": recipe.seed, "base": recipe.base,
              "reference": str(reference_export), "seconds": round(time.time() - t0, 2)}
    write_json_atomic(files.result, result)
    return result


# --------------------------------------------------------------------------- the whole method


def run_doremi(recipe: Recipe, recipe_file: Path, cfg: DoremiConfig, out: Path,
               on_event: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Reference, Group-DRO proxy, averaged weights (and verification); returns (and writes) the summary."""
    index, tokens, start, center, settings = method_setup(recipe, recipe_file, cfg, PROXY_KEYS)
    names = list(center)
    uniform = {n: 1.0 / len(names) for n in names}
    reference = uniform if cfg.reference == "uniform" else dict(center)
    check_settings(out, settings, "doremi.json")

    def proxy(directory: Path, w: Sequence[float], seed: int | None = None, budget: int = tokens) -> Proxy:
        mixture = {n: round(float(x), 6) for n, x in zip(names, w)}
        data = derive_recipe(recipe, index, mixture=mixture, tokens=budget, run_dir=ProxyLayout(directory).run.root,
                             start=start, seed=seed, tasks=["loss"])
        return Proxy(directory, cfg.stage, data)

    def target_run(directory: Path, w: Sequence[float], seed: int | None = None) -> Proxy:
        return proxy(directory, w, seed, budget=recipe.stages[index].tokens)  # the weights' use: the stage itself

    emit = on_event or (lambda kind, info: None)
    ref_proxy = proxy(out / "reference", [reference[n] for n in names])
    dro_proxy = proxy(out / "proxy", [reference[n] for n in names])
    export = ProxyLayout(ref_proxy.dir).run.stage(cfg.stage).export
    if not dro_proxy.done and ref_proxy.done and not (export / "config.json").is_file():
        ref_proxy.result_file.unlink()  # its weights were dropped after an earlier proxy: the proxy needs them
    emit("start", {"total": 2, "done": ref_proxy.done + dro_proxy.done, "phase": "reference + proxy"})
    [ref_result] = run_proxies([ref_proxy], threads=cfg.threads, keep_models=True,
                               on_done=lambda p, r: emit("proxy", {"proxy": p, "result": r}))
    was_done = dro_proxy.done
    log = ProxyLayout(dro_proxy.dir).log
    dro_proxy.dir.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh, contextlib.redirect_stdout(fh):
        result = train_dro_proxy(dro_proxy, export, step_size=cfg.step_size, smoothing=cfg.smoothing,
                                 threads=cfg.threads)
    if not was_done:
        emit("proxy", {"proxy": dro_proxy, "result": result})
    if not cfg.keep_models:
        for weights in ProxyLayout(ref_proxy.dir).run.weight_dirs:
            shutil.rmtree(weights, ignore_errors=True)

    named = {"doremi": result["average"], "recipe": dict(center), "uniform": uniform}
    summary: dict[str, Any] = {
        "settings": {**settings, **{k: v for k, v in asdict(cfg).items() if k not in settings}},
        "sources": names,
        "reference": {"mixture": reference, "metrics": ref_result["metrics"]},
        "proxy": {k: result[k] for k in ("average", "final", "steps", "tokens", "seconds")},
        "mixtures": named,
        "target": cfg.target,
    }
    note = (f"midtrain mix doremi: DoReMi domain weights of stage {cfg.stage!r} (Group DRO against a reference on "
            f"the {cfg.reference} mixture),\naveraged over the proxy's {result['steps']} steps of "
            f"{tokens:,} tokens (step size {cfg.step_size:g}, smoothing {cfg.smoothing:g})")
    return conclude(summary, "doremi", target_run, out, cfg, emit, note,
                    recipe.stages[index].data.replay is not None)
