"""One training step of pre-training, in plain PyTorch, and the single-process loop around it.

The pieces are separate so that the Ray Train worker loop (`raysys.pretrain.ray_train`) drives the
very same step as `train_local`:

    setup = prepare(cfg, data_dir, rank, world_size)   # tokenizer, shard corpus, streams, recipe
    tr = make_trainee(cfg, setup, device, batches_per_epoch, wrap=<DDP placement or None>)
    for s in range(tr.plan.total):
        comps, lr, samples, tokens = tr.step(s)       # grad_accum micro-batches, one update

`make_step(cfg, recipe)` is the loss of one step: `step_fn(model, batch_or_batches, epoch) ->
(loss, components)`; `loss` is the tensor to backpropagate (the §3.4 curriculum loss of
`raysys.pretrain.curriculum.granularity_loss`); `components` are floats: each objective's
*unweighted* mean per granularity (`rt.mlm`, `rp.pmrtc`, `is.itm`, …), the mean `w_ITM` where it
applies (`is.w_itm`), and `loss`. Under DDP every rank must run the same mixer (pass batch counts
that agree across ranks — e.g. all-reduced with MIN) so the ranks step through the same
granularities. `Trainee.step` runs `raysys.pretrain.optim.Optimizer` (backward, accumulation,
clipping, AdamW, schedule), the optimiser step every training loop of raysys shares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysys import config as rconfig
from raysys import progress
from raysys.config import ConfigError
from raysys.contract import write_text_atomic
from raysys.corpus.concepts import ensure_concepts
from raysys.pretrain.config import PretrainConfig
from raysys.pretrain.curriculum import Mixer, granularity_loss, make_mixer
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
from raysys.pretrain.optim import Optimizer
from raysys.pretrain.recipes import Recipe, joined, model_overrides, resolve
from raysys.pretrain.region_init import REGION_INITS, init_region_projection
from raysys.pretrain.stream import StreamFeed, StreamPlan, local_rows, rank_items, sample_corpus, total_micro
from raysys.pretrain.stream import plan as stream_plan

log = logging.getLogger(__name__)

STANDARD_OBJECTIVES = ("mlm", "mrc", "mrfr", "pmrtc", "itm")


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
    over = model_overrides(cfg)  # the recipe's encoder and objectives (mvptr, muvla+vsc)
    return ModelConfig(
        model_path=cfg.model_path, num_layers=cfg.model_layers, feature_dim=feature_dim,
        num_classes=num_classes, dropout=cfg.dropout, pooling=cfg.pooling,
        objectives=objective_names(STANDARD_OBJECTIVES, over["objectives"], cfg.extra_objectives),
        encoder=over["encoder"], uni_layers=over["uni_layers"], fusion=over["fusion"],
        objective_options={"codis": dataclasses.asdict(cfg.codis), "unimo2": dataclasses.asdict(cfg.unimo2),
                           "mvptr": dataclasses.asdict(cfg.mvptr)},
    )  # fmt: skip


def check_options(cfg: PretrainConfig) -> None:
    """Fail on the fields no later stage would catch before the first step."""
    if cfg.region_init not in REGION_INITS:
        raise ConfigError(f"region_init: {cfg.region_init!r} is not one of {list(REGION_INITS)}")
    if not 0.0 <= cfg.mrm_keep_ratio < 1.0:
        raise ConfigError(f"mrm_keep_ratio: {cfg.mrm_keep_ratio} is not in [0, 1)")
    known = objective_names(STANDARD_OBJECTIVES, model_overrides(cfg)["objectives"], cfg.extra_objectives)
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
    needs = corpus_needs(list(recipe.granularities), recipe.options)
    if "concepts" in needs and world_size == 1:  # one process: build the vocabulary here (Ray: the driver's plan)
        ensure_concepts(data, cfg.min_concept_count)
    corpus = load_corpus(data, cfg, needs, rank, world_size)
    streams = build_streams(corpus, list(recipe.granularities), tok, cfg, rank)
    return Setup(recipe, tok, corpus, streams, model_config(cfg, corpus.feature_dim, corpus.num_classes))


def prepare_stream(
    cfg: PretrainConfig, data: str | Path, world_size: int = 1, sp: StreamPlan | None = None
) -> tuple[Setup, StreamPlan]:
    """The streamed input's setup (`input=stream`): the recipe, tokenizer and the run's window
    plan (`raysys.pretrain.stream.plan`, or the driver's `sp`); its corpus is only the sample
    `region_init=tags` fits on (the first windows' regions), never the shard."""
    check_options(cfg)
    recipe = resolve(cfg)
    tok = load_tokenizer(cfg.model_path)
    sp = sp or stream_plan(data, cfg, recipe, world_size)
    corpus = sample_corpus(sp, cfg, recipe, features=cfg.region_init == "tags" and recipe.update)
    return Setup(recipe, tok, corpus, {}, model_config(cfg, corpus.feature_dim, corpus.num_classes)), sp


def stream_feed(cfg: PretrainConfig, setup: Setup, sp: StreamPlan, plan: Plan, start: int = 0) -> StreamFeed:
    """This process's steps of the stream (the local loop's; a Ray Train worker reads Ray Data's)."""
    items = rank_items(sp, cfg.seed, 0, plan.total * plan.grad_accum, start * plan.grad_accum)
    return StreamFeed(local_rows(sp, cfg, items))


def stream_run_plan(cfg: PretrainConfig, sp: StreamPlan, steps: int | None = None) -> Plan:
    """Optimiser steps of a streamed run: `per_epoch` from the window plan (or `steps_per_epoch`)."""
    return Plan(sp.per_epoch, total_micro(sp, cfg, steps) // sp.grad_accum, sp.grad_accum)


def build_pretrain_model(cfg: PretrainConfig, setup: Setup) -> VLModel:
    """A fresh model for pre-training: `build_model`, then the `region_init` of the visual
    projection (only when the recipe trains; `base` stays the untouched model)."""
    model = build_model(setup.model_config, seed=cfg.seed)
    if cfg.region_init == "tags" and setup.recipe.update:
        init_region_projection(model, setup.corpus, setup.tokenizer, cfg.region_init_ridge,
                               cfg.region_init_max_regions, cfg.seed)  # fmt: skip
    return model


# ---------------------------------------------------------------- the step's loss


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
            part, logged = granularity_loss(model, batch, epoch, cfg.m, recipe.w_itm, cfg.loss_weights)
            names += [f"{g}.{name}" for name, _ in logged]
            values += [v for _, v in logged]
            total = part if total is None else total + part
        assert total is not None
        floats = torch.stack([total.detach().float(), *[v.float() for v in values]]).tolist()
        comps = {"loss": floats[0], **dict(zip(names, floats[1:]))}
        return total, comps

    return step


# ---------------------------------------------------------------- one optimiser step


@dataclass(frozen=True)
class Plan:
    """Optimiser steps of the run. A step takes `grad_accum` consecutive mixer slots
    (micro-steps); epochs are counted in optimiser steps (with grad_accum=1, one mixer slot each)."""

    per_epoch: int
    total: int
    grad_accum: int

    @classmethod
    def of(cls, cfg: PretrainConfig, mixer_steps_per_epoch: int, steps: int | None = None) -> Plan:
        """`steps` (the CLI's `--steps`) overrides `cfg.steps`. `grad_accum` is a Ray Train setting
        (`TrainConfig`); the local loop's `PretrainConfig` has none, i.e. 1."""
        grad_accum = getattr(cfg, "grad_accum", 1)
        if grad_accum < 1:
            raise ConfigError(f"grad_accum: {grad_accum} must be ≥ 1")
        per_epoch = cfg.steps_per_epoch or max(1, mixer_steps_per_epoch // grad_accum)
        total = steps if steps is not None else (cfg.steps or cfg.epochs * per_epoch)
        return cls(per_epoch, total, grad_accum)

    def epoch(self, step: int) -> int:
        return step // self.per_epoch

    def epochs_done(self, steps_done: int) -> int:
        return -(-steps_done // self.per_epoch) if steps_done else 0


def mean_components(parts: list[dict[str, float]]) -> dict[str, float]:
    """The components of one optimiser step: each key's mean over the micro-batches that had it."""
    acc: dict[str, list[float]] = {}
    for p in parts:
        for k, v in p.items():
            acc.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def count_tokens(batch: dict[str, Any]) -> int:
    """Sequence positions the encoder attends to: text tokens + regions."""
    return int(batch["text_mask"].sum()) + int(batch["region_mask"].sum())


@dataclass
class Trainee:
    """Everything one rank trains with, and `step(s)`: one optimiser step (its `grad_accum`
    micro-batches, backward, clipping, AdamW, scheduler). `train_local`, the Ray Train worker loop
    and `raysys bench train` all call this, so the three run the same step and the benchmark
    measures what Ray Train adds and nothing else."""

    model: Any  # what is called: the DDP wrapper under Ray Train with > 1 worker, else the VLModel
    module: VLModel  # the VLModel (what checkpoints hold)
    optim: Optimizer | None  # None: a recipe without updates (`base`)
    streams: dict[str, GranularityStream]  # input=memory
    mixer: Mixer | None  # input=memory
    plan: Plan
    step_fn: Any
    device: torch.device
    is_ddp: bool = False
    bf16: bool = False  # CUDA only: bf16 autocast
    feed: StreamFeed | None = None  # input=stream: the micro-steps, in order
    granularities: str = ""  # of the last step, e.g. "rt+rp+is"
    recipe: Recipe | None = None  # input=memory: its `joined` granularities of each epoch are mixed
    mixers: dict[tuple[str, ...], Mixer] = dataclasses.field(default_factory=dict)  # input=memory, per joined set

    def autocast(self):
        if self.device.type == "cuda" and self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def batches(self, micro_step: int) -> list[dict[str, Any]]:
        if self.feed is not None:
            return [to_device(b, self.device) for b in self.feed.batches(micro_step)]
        mixer = self.mixer
        names = joined(self.recipe, self.plan.epoch(micro_step // self.plan.grad_accum)) if self.recipe else ()
        if names and list(names) != mixer.names:  # a curriculum that adds corpora later (unimo2)
            mixer = self.mixers.setdefault(names, make_mixer(self.recipe.mixing, list(names), mixer.nb, mixer.seed))
        return [to_device(self.streams[g].batch(j), self.device) for g, j in mixer.at(micro_step)]

    def step(self, s: int) -> tuple[dict[str, float], float, int, int]:
        """Run optimiser step `s`; returns (mean loss components, lr used, samples, tokens)."""
        epoch = self.plan.epoch(s)
        lr = self.optim.lr if self.optim is not None else 0.0
        parts: list[dict[str, float]] = []
        samples = tokens = 0
        for a in range(self.plan.grad_accum):
            batches = self.batches(s * self.plan.grad_accum + a)
            self.granularities = "+".join(b["granularity"] for b in batches)
            samples += sum(int(b["input_ids"].shape[0]) for b in batches)
            tokens += sum(count_tokens(b) for b in batches)
            if self.optim is None:  # losses only
                with torch.no_grad(), self.autocast():
                    _, comps = self.step_fn(self.model, batches, epoch)
            else:
                last = a == self.plan.grad_accum - 1
                with self.model.no_sync() if (self.is_ddp and not last) else contextlib.nullcontext():
                    with self.autocast():
                        loss, comps = self.step_fn(self.model, batches, epoch)
                    self.optim.backward(loss)
            parts.append(comps)
        if self.optim is not None:
            self.optim.update()
            for objective in self.module.objectives.values():
                objective.after_update(self.module)
        comps = mean_components(parts)
        if not math.isfinite(comps["loss"]):
            raise FloatingPointError(f"step {s}: loss is {comps['loss']} ({comps})")
        return comps, lr, samples, tokens


def make_trainee(
    cfg: PretrainConfig, setup: Setup, device: torch.device, batches_per_epoch: dict[str, int], wrap=None,
    steps: int | None = None, plan: Plan | None = None, feed: StreamFeed | None = None,
) -> Trainee:  # fmt: skip
    """Build model, optimiser, schedule and mixer for one rank. `wrap(model)` places the model
    (Ray Train's `prepare_model`); without it the model is moved to `device`. `compile` and `bf16`
    are `TrainConfig` (CUDA) settings; a `PretrainConfig` trains uncompiled in float32. With a
    `feed` (input=stream) the steps come from it and `plan` says how many; else from the mixer."""
    recipe = setup.recipe
    mixer = None
    if feed is None:
        mixer = make_mixer(recipe.mixing, list(recipe.granularities), batches_per_epoch, cfg.seed)
        plan = Plan.of(cfg, mixer.steps_per_epoch, steps)
    assert plan is not None
    module = build_pretrain_model(cfg, setup)
    if device.type == "cuda" and getattr(cfg, "compile", False):
        module.lm.bert.encoder.compile(dynamic=True)  # in place: state_dict keys are unchanged
    model = wrap(module) if wrap is not None else module.to(device)
    module.train()
    optim = Optimizer.build(module, cfg, plan.total, plan.grad_accum) if recipe.update else None
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return Trainee(model, module, optim, setup.streams, mixer, plan, make_step(cfg, recipe), device, is_ddp,
                   bf16=getattr(cfg, "bf16", False), feed=feed, recipe=recipe)  # fmt: skip


# ---------------------------------------------------------------- the local loop


def train_local(
    cfg: PretrainConfig, data: str | Path, out: str | Path | None = None, steps: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Single-process pre-training for debugging and tests. Returns the summary the CLI prints.
    `extra` joins the checkpoint's extra dict (the CLI's MLflow run id and store, for evaluations)."""
    t0 = time.perf_counter()
    if steps is not None:  # recorded as run: pretrain.yaml and the checkpoint say the steps taken
        cfg = dataclasses.replace(cfg, steps=steps)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    np.random.seed(cfg.seed)
    if cfg.input == "stream":
        setup, sp = prepare_stream(cfg, data)
        plan = stream_run_plan(cfg, sp, steps)
        tr = make_trainee(cfg, setup, device, {}, plan=plan, feed=stream_feed(cfg, setup, sp, plan))
    else:
        setup = prepare(cfg, data)
        tr = make_trainee(cfg, setup, device, {g: len(s) for g, s in setup.streams.items()}, steps=steps)
    torch.manual_seed(cfg.seed)  # dropout stream: the same seed gives the same run
    history: list[dict[str, float]] = []
    samples = 0
    t_train = time.perf_counter()
    for s in progress.track(range(tr.plan.total), desc="pretrain", unit="step"):
        comps, _, n, _ = tr.step(s)
        samples += n
        epoch = tr.plan.epoch(s)
        row = {"step": s, "epoch": epoch, "granularity": tr.granularities, **comps}
        history.append(row)
        if cfg.log_every and (s % cfg.log_every == 0 or s == tr.plan.total - 1):
            parts = " ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float))
            log.info("step %d/%d epoch %d [%s] %s", s + 1, tr.plan.total, epoch, row["granularity"], parts)
    train_s = time.perf_counter() - t_train
    result = _summary(cfg, setup.recipe, tr.plan, history)
    result["samples_per_s"] = round(samples / train_s, 2) if train_s > 0 else None
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["device"] = str(device)
    if out is not None:
        out = Path(out)
        ckpt = out / "model.pt"
        ck_extra = {"recipe": cfg.recipe, "steps": tr.plan.total, "pretrain_config": rconfig.to_dict(cfg), **(extra or {})}
        save_checkpoint(ckpt, tr.module, ck_extra)
        write_text_atomic(out / "pretrain.yaml", rconfig.dump(cfg))
        result["checkpoint"] = str(ckpt)
    result["history"] = history
    return result


def _summary(cfg: PretrainConfig, recipe: Recipe, plan: Plan, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The CLI's JSON line (its keys in their printed order; timing and checkpoint filled in after)."""
    last: dict[str, float] = {}
    for row in history:
        last.update({k: v for k, v in row.items() if isinstance(v, float)})
    components = {k: v for k, v in last.items() if k != "loss"}
    tail = [h["loss"] for h in history[-10:]]
    total, per_epoch = plan.total, plan.per_epoch
    return {
        "recipe": cfg.recipe,
        "granularities": list(recipe.granularities),
        "mixing": recipe.mixing,
        "steps": total,
        "updates": total if recipe.update else 0,
        "epochs": (total + per_epoch - 1) // per_epoch if total else 0,
        "steps_per_epoch": per_epoch,
        "final_loss": history[-1]["loss"] if history else None,
        "final_loss_mean10": float(np.mean(tail)) if tail else None,
        "components": components,
        **components,
        "samples_per_s": None,
        "seconds": None,
        "device": None,
        "checkpoint": None,
    }
