"""Pre-training in plain PyTorch: the config, the per-step function, and a single-process loop.

The pieces are separate so that the Ray Train loop (distributed issue) reuses them unchanged:

    cfg = config.load(PretrainConfig, path, overrides)
    setup = prepare(cfg, data_dir, rank, world_size)       # tokenizer, shard corpus, streams, recipe
    model = build_pretrain_model(cfg, setup)  # then prepare_model / DDP
    mixer = make_mixer(..., batches_per_epoch=<same on every rank>)
    step_fn = make_step(cfg, setup.recipe)
    for step in ...:
        batches = [to_device(setup.streams[g].batch(j), device) for g, j in mixer.at(step)]
        loss, components = step_fn(model, batches, epoch=step // steps_per_epoch)

`step_fn(model, batch_or_batches, epoch) -> (loss, components)`: `loss` is the tensor to
backpropagate (the §3.4 curriculum loss); `components` are floats: each objective's *unweighted*
mean per granularity (`rt.mlm`, `rp.pmrtc`, `is.itm`, …), the mean `w_ITM` where it applies
(`is.w_itm`), and `loss`. Under DDP every rank must run the same mixer (pass batch counts that
agree across ranks — e.g. all-reduced with MIN) so the ranks step through the same granularities.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysys.pretrain.curriculum import (
    WEIGHTED_GRANULARITIES,
    itm_match_weights,
    make_mixer,
    reduce_term,
    weights_active,
)
from raysys.pretrain.granularities import (
    Corpus,
    GranularityStream,
    build_streams,
    corpus_needs,
    load_corpus,
    to_device,
)
from raysys.pretrain.model import (
    ModelConfig,
    VLModel,
    build_model,
    load_tokenizer,
    objective_names,
    save_checkpoint,
)
from raysys.pretrain.recipes import Recipe, resolve

log = logging.getLogger(__name__)

STANDARD_OBJECTIVES = ("mlm", "mrc", "mrfr", "pmrtc", "itm")


@dataclass
class PretrainConfig:
    """Every knob of pre-training; Tune addresses them by name (`m`, `granularities`, `k`, …)."""

    recipe: str = "muvla"  # see raysys.pretrain.recipes: muvla, base, random_pairs, paired_ratio, round_robin, rt+rp, …
    granularities: list[str] = field(default_factory=lambda: ["rt", "rp", "is"])  # muvla's subset
    mixing: str = "round_robin"  # round_robin | proportional | joint (raysys.pretrain.curriculum)
    m: int = 1  # epoch from which w_ITM weights R-P and I-S (paper: 1)
    w_itm: bool = True  # the §3.4 weighting on/off (Table 4)
    k: int = 5  # use retrieved pairs with rank < k (one top-max(K) retrieval serves a K sweep)
    paired_ratio: float = 0.0  # paired_ratio recipe: fraction r of true gold pairs
    # masking
    mlm_prob: float = 0.15  # sentence tokens (I-S, text-only, pairs)
    mrm_prob: float = 0.15  # regions of the pairs baseline
    rt_tag_mask_prob: float = 0.15  # R-T: tags (whole tags)
    rt_region_mask_prob: float = 0.15  # R-T: regions
    rp_mask_scale: float = 1.0  # R-P: a link is masked with min(1, scale · link_score)
    rp_text_prob: float = 0.5  # R-P: probability a sample masks the phrase side (else the region side)
    is_neg_prob: float = 0.5  # I-S: share of negatives (random image)
    # data
    max_text_len: int = 40  # tokens including [CLS] and [SEP]
    max_regions: int = 36
    max_images: int = 0  # use only the first N eligible images (0 = all); for debugging/overfit
    exclude_eval: bool = True  # keep gold "eval" images out of pre-training
    num_classes: int = 0  # MRC classes; 0 = len(manifest tag_vocab)
    # model
    model_path: str = ""  # any HF BERT folder; "" = the packaged MiniLM
    model_layers: int = 0  # keep the first N encoder layers (0 = all)
    dropout: float | None = None  # None = the checkpoint's
    pooling: str = "auto"  # ITM head input: cls | mean | auto (the backbone's own; mean for MiniLM)
    region_init: str = "random"  # random (paper) | tags: ridge map from region features to tag words (raysys.pretrain.region_init)
    region_init_ridge: float = 1.0  # λ of that ridge regression
    region_init_max_regions: int = 50000  # seeded sample of tagged regions the fit reads (0 = all)
    extra_objectives: list[str] = field(default_factory=list)  # registered objectives beyond the standard five
    loss_weights: dict[str, float] = field(default_factory=dict)  # objective → factor on its loss (absent = 1)
    # optimisation
    batch_size: int = 32
    lr: float = 6e-5  # paper's peak
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 = off
    steps: int = 0  # 0 = epochs × steps_per_epoch
    epochs: int = 1
    steps_per_epoch: int = 0  # 0 = from the mixer (one pass over the granularity data)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default
    log_every: int = 10


# ---------------------------------------------------------------- setup


@dataclass
class Setup:
    recipe: Recipe
    tokenizer: Any
    corpus: Corpus
    streams: dict[str, GranularityStream]
    model_config: ModelConfig


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_config(cfg: PretrainConfig, feature_dim: int, num_classes: int) -> ModelConfig:
    return ModelConfig(
        model_path=cfg.model_path, num_layers=cfg.model_layers, feature_dim=feature_dim,
        num_classes=num_classes, dropout=cfg.dropout, pooling=cfg.pooling,
        objectives=objective_names(STANDARD_OBJECTIVES, cfg.extra_objectives),
    )  # fmt: skip


def check_options(cfg: PretrainConfig) -> None:
    """Fail on the fields no later stage would catch before the first step."""
    from raysys.config import ConfigError
    from raysys.pretrain.region_init import REGION_INITS

    if cfg.region_init not in REGION_INITS:
        raise ConfigError(f"region_init: {cfg.region_init!r} is not one of {list(REGION_INITS)}")
    known = objective_names(STANDARD_OBJECTIVES, cfg.extra_objectives)
    for name, w in cfg.loss_weights.items():
        if name not in known:
            raise ConfigError(f"loss_weights.{name}: not an objective of this model; known: {list(known)}")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ConfigError(f"loss_weights.{name}: {w!r} must be a finite number ≥ 0")


def prepare(cfg: PretrainConfig, data: str | Path, rank: int = 0, world_size: int = 1) -> Setup:
    """Resolve the recipe and load this rank's shard of the data, tokenizer and streams."""
    check_options(cfg)
    recipe = resolve(cfg)
    tok = load_tokenizer(cfg.model_path)
    corpus = load_corpus(data, cfg, corpus_needs(list(recipe.granularities), recipe.options), rank, world_size)
    streams = build_streams(corpus, list(recipe.granularities), tok, cfg, rank)
    return Setup(recipe, tok, corpus, streams, model_config(cfg, corpus.feature_dim, corpus.num_classes))


def build_pretrain_model(cfg: PretrainConfig, setup: Setup) -> VLModel:
    """A fresh model for pre-training: `build_model`, then the `region_init` of the visual
    projection (only when the recipe trains; `base` stays the untouched model)."""
    model = build_model(setup.model_config, seed=cfg.seed)
    if cfg.region_init == "tags" and setup.recipe.update:
        from raysys.pretrain.region_init import init_region_projection

        init_region_projection(model, setup.corpus, setup.tokenizer, cfg.region_init_ridge,
                               cfg.region_init_max_regions, cfg.seed)  # fmt: skip
    return model


# ---------------------------------------------------------------- the step


def match_weights(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """w_ITM for each sample of a batch: the model's match probability on the *unmasked* pair, in
    eval mode and without gradient (masking the linked phrase would otherwise bias the estimate)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean = {**batch, "input_ids": batch["clean_input_ids"], "region_masked": None, "objectives": ()}
            logits = model(clean)["itm_logits"]
    finally:
        model.train(was_training)
    return itm_match_weights(logits, batch["itm_eligible"])


def make_step(cfg: PretrainConfig, recipe: Recipe):
    """The curriculum loss of §3.4 as a function `step(model, batch | [batches], epoch)`."""

    def step(model: torch.nn.Module, batches: dict | list[dict], epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        if isinstance(batches, dict):
            batches = [batches]
        total: torch.Tensor | None = None
        names: list[str] = []
        values: list[torch.Tensor] = []
        for batch in batches:
            g = batch["granularity"]
            weights = None
            if g in WEIGHTED_GRANULARITIES and weights_active(epoch, cfg.m, recipe.w_itm):
                weights = match_weights(model, batch)
                elig = batch["itm_eligible"]
                if bool(elig.any()):
                    names.append(f"{g}.w_itm")
                    values.append(weights[elig.to(weights.device)].mean())
            out = model(batch)
            part = out["aux_zero"]
            for name, res in out["losses"].items():
                term = reduce_term(res, weights)
                part = part + (term * cfg.loss_weights[name] if name in cfg.loss_weights else term)
                if bool(res.valid.any()):
                    names.append(f"{g}.{name}")
                    values.append(reduce_term(res).detach())
            total = part if total is None else total + part
        assert total is not None
        floats = torch.stack([total.detach().float(), *[v.float() for v in values]]).tolist()
        comps = {"loss": floats[0], **dict(zip(names, floats[1:]))}
        return total, comps

    return step


# ---------------------------------------------------------------- optimiser


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig, total_steps: int):
    """AdamW (no decay on biases and LayerNorms), linear warm-up then linear decay to 0."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)  # biases, LayerNorms, the modality vector
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    warm = max(1, int(round(cfg.warmup_ratio * total_steps))) if cfg.warmup_ratio > 0 else 0

    def factor(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        return max(0.0, (total_steps - s) / max(1, total_steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------- the local loop


def train_local(
    cfg: PretrainConfig, data: str | Path, out: str | Path | None = None, steps: int | None = None
) -> dict[str, Any]:
    """Single-process pre-training for debugging and tests. Returns the summary the CLI prints."""
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    np.random.seed(cfg.seed)
    setup = prepare(cfg, data)
    recipe = setup.recipe
    model: VLModel = build_pretrain_model(cfg, setup).to(device)
    model.train()
    names = list(recipe.granularities)
    mixer = make_mixer(recipe.mixing, names, {g: len(s) for g, s in setup.streams.items()}, cfg.seed)
    per_epoch = cfg.steps_per_epoch or mixer.steps_per_epoch
    total = steps if steps is not None else (cfg.steps or cfg.epochs * per_epoch)
    opt = sched = None
    if recipe.update:
        opt, sched = make_optimizer(model, cfg, total)
    step_fn = make_step(cfg, recipe)
    torch.manual_seed(cfg.seed)  # dropout stream: the same seed gives the same run
    history: list[dict[str, float]] = []
    last: dict[str, float] = {}
    samples = 0
    t_train = time.perf_counter()
    for s in range(total):
        epoch = s // per_epoch
        batches = [to_device(setup.streams[g].batch(j), device) for g, j in mixer.at(s)]
        samples += sum(int(b["input_ids"].shape[0]) for b in batches)
        if recipe.update:
            loss, comps = step_fn(model, batches, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
        else:
            with torch.no_grad():
                loss, comps = step_fn(model, batches, epoch)
        comps = {"step": s, "epoch": epoch, "granularity": "+".join(b["granularity"] for b in batches), **comps}
        history.append(comps)
        last.update({k: v for k, v in comps.items() if isinstance(v, float)})
        if not math.isfinite(comps["loss"]):
            raise FloatingPointError(f"step {s}: loss is {comps['loss']} ({comps})")
        if cfg.log_every and (s % cfg.log_every == 0 or s == total - 1):
            parts = " ".join(f"{k}={v:.4f}" for k, v in comps.items() if isinstance(v, float))
            log.info("step %d/%d epoch %d [%s] %s", s + 1, total, epoch, comps["granularity"], parts)
    train_s = time.perf_counter() - t_train
    components = {k: v for k, v in last.items() if k != "loss"}
    tail = [h["loss"] for h in history[-10:]]
    result: dict[str, Any] = {
        "recipe": cfg.recipe,
        "granularities": names,
        "mixing": recipe.mixing,
        "steps": total,
        "updates": total if recipe.update else 0,
        "epochs": (total + per_epoch - 1) // per_epoch if total else 0,
        "steps_per_epoch": per_epoch,
        "final_loss": history[-1]["loss"] if history else None,
        "final_loss_mean10": float(np.mean(tail)) if tail else None,
        "components": components,
        **components,
        "samples_per_s": round(samples / train_s, 2) if train_s > 0 else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "device": str(device),
        "checkpoint": None,
    }
    if out is not None:
        from raysys import config as rconfig
        from raysys.contract import write_text_atomic

        out = Path(out)
        ckpt = out / "model.pt"
        save_checkpoint(ckpt, model, {"recipe": cfg.recipe, "steps": total, "pretrain_config": rconfig.to_dict(cfg)})
        write_text_atomic(out / "pretrain.yaml", rconfig.dump(cfg))
        result["checkpoint"] = str(ckpt)
    result["history"] = history
    return result
