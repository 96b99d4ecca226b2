"""Fine-tuning on the downstream tasks (paper 000 appendix C; 001 appendix A) and the meta-average.

One loop for every task. What differs between tasks — the readers, the head, the batches, the loss
and the metric — is the task's own module under `raysys.evaluate.tasks`, found by name in its
registry; this loop never names a task. The five of the papers:

| task | input | head | loss | metric (percent) |
|---|---|---|---|---|
| `vqa` | [question, image] | MLP on [CLS] → answer vocabulary (3,129 most frequent by default) | BCE on soft scores (the answer's own VQA accuracy: 0.3/0.6/0.9/1) | official VQA accuracy |
| `nlvr2` | [sentence, left] and [sentence, right] | MLP on the two [CLS] vectors concatenated | CE, 2-way | accuracy |
| `ve` | [hypothesis, image] | MLP on [CLS] | CE, 3-way | accuracy |
| `refcoco` | [expression, image regions] | MLP on every region's output → a score | BCE per region (IoU > 0.5 with the gold box = positive) | accuracy: IoU(best region, gold) > 0.5 |
| `retrieval` | [caption, image] | the pre-training ITM head | CE, each positive with `negatives` sampled mismatched pairs | R@1/5/10 both ways; headline mean recall |

Heads are UNITER's (Linear → GELU → LayerNorm → Linear). The optimiser step is pre-training's
(`raysys.pretrain.optim.Optimizer`: AdamW, no decay on biases and LayerNorms, linear warm-up over
`warmup_ratio` of the steps then linear decay, clipping). Hyper-parameters default to the papers'
values (000 App. C for VQA, NLVR2, VE, RefCOCO+ — RefCOCO+'s batch size, which 000 omits, from
001 App. A; 001 App. A for retrieval), each a config field (`vqa.lr=1e-4`); `steps=N` caps every
task at N optimizer steps for smoke runs. A task registered from a plugin trains with its own
`Task.hyper` defaults (FinetuneConfig has sections for the five above only).

Meta-average: the unweighted mean of the headline scores of VQA, NLVR2, VE and RefCOCO+ among the
tasks run (`raysys.evaluate.metrics.meta_average`, which reproduces the paper's Meta-Ave column).

MLflow: each task is a new run tagged `raysys.parent_run_id` (and `mlflow.parentRunId`) = the
checkpoint's pre-training run, holding the task's params, per-step loss and metrics; a suite's
meta-average is one more child run (`finetune-meta`). The pre-training run itself is never written:
its tags and params describe the pre-training, and re-evaluating with other settings adds runs.
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
from torch import nn

from raysys import progress, tracking
from raysys.config import ConfigError, to_dict
from raysys.contract import ContractError, read_manifest
from raysys.evaluate.downstream import (
    ImageIndex,
    ModelSource,
    check_feature_dim,
    checkpoint_extra,
    image_ids,
    load_images,
    load_model,
    log_mlflow,
    numeric,
    parent_run_id,
    pick_device,
    text_settings,
    to_device,
    tokenize,
)
from raysys.evaluate.metrics import META_TASKS, meta_average
from raysys.evaluate.tasks import Encoded, Example, State, Task, TaskData, TaskHyper, get_task, read_task
from raysys.evaluate.tasks.nlvr2 import NLVR2Hyper
from raysys.evaluate.tasks.refcoco import RefCOCOHyper
from raysys.evaluate.tasks.retrieval import RetrievalHyper
from raysys.evaluate.tasks.ve import VEHyper
from raysys.evaluate.tasks.vqa import VQAHyper
from raysys.pretrain.model import load_tokenizer
from raysys.pretrain.optim import Optimizer

log = logging.getLogger(__name__)

__all__ = [
    "FinetuneConfig", "NLVR2Hyper", "RefCOCOHyper", "RetrievalHyper", "TaskData", "TaskHyper", "TaskModel", "TaskRun",
    "VEHyper", "VQAHyper", "finetune_task", "hyper", "prepare_data", "run_finetune", "train_task", "with_meta_average",
]  # fmt: skip


# ---------------------------------------------------------------- configuration


@dataclass
class TaskRun:
    """One task to fine-tune and evaluate: its files and where its images are."""

    task: str = ""
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    images: str = ""  # dataset dir with images/ (from `raysys featurize` or `raysys import lxmert-tsv`)
    eval_images: str = ""  # "" = same as images
    format: str = "auto"


@dataclass
class FinetuneConfig:
    """Options of `raysys evaluate finetune`; `runs` lists the tasks of a suite (meta-average)."""

    vqa: VQAHyper = field(default_factory=VQAHyper)
    nlvr2: NLVR2Hyper = field(default_factory=NLVR2Hyper)
    ve: VEHyper = field(default_factory=VEHyper)
    refcoco: RefCOCOHyper = field(default_factory=RefCOCOHyper)
    retrieval: RetrievalHyper = field(default_factory=RetrievalHyper)
    runs: list[TaskRun] = field(default_factory=list)
    steps: int = 0  # > 0: cap every task at this many optimizer steps (smoke runs on fixtures)
    eval_batch_size: int = 64
    max_text_len: int = 0  # 0 = the checkpoint's pre-training value (40)
    max_regions: int = 0  # 0 = the checkpoint's pre-training value (36)
    strict: bool = False  # an example whose image is missing fails the run (else it is skipped and counted)
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    base_seed: int = 0  # `base`: seed of the fresh heads
    model_path: str = ""  # `base`: backbone folder ("" = packaged MiniLM)
    base_layers: int = 0  # `base`: keep the first N encoder layers (0 = all)
    log_every: int = 10
    items: bool = False  # keep each eval item's own score in the result (`items`: ids, scores), for bootstraps
    mlflow: bool = True
    tracking_uri: str = ""
    experiment: str = "raysys"
    parent_run_id: str = ""  # "" = the run recorded in the checkpoint


def hyper(cfg: FinetuneConfig, task: str) -> TaskHyper:
    """The task's section of the config, or the task's own defaults when the config has none
    (a task from a plugin)."""
    hp = getattr(cfg, task, None)
    return hp if isinstance(hp, TaskHyper) else get_task(task).hyper()


# ---------------------------------------------------------------- the model


class TaskModel(nn.Module):
    """The pre-trained encoder plus a task's head; the head reads the encoder's outputs."""

    def __init__(self, vl: nn.Module, head: nn.Module):
        super().__init__()
        self.vl = vl
        self.head = head

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        text_h, region_h = self.vl.encode(batch)
        return self.head(Encoded(text_h, region_h, self.vl.pool(text_h, region_h, batch), self.vl), batch)


# ---------------------------------------------------------------- data


def prepare_data(examples: list[Example], root: str | Path, tokenizer, max_text_len: int, max_regions: int,
                 strict: bool) -> TaskData:  # fmt: skip
    """Resolve each example's images against `root`'s images/ (an example with a missing image is
    skipped and counted, or fails the run when `strict`), load those images, tokenise the texts."""
    root = Path(root)
    index = ImageIndex(image_ids(root))
    keep, refs, skipped, first_missing = [], [], 0, ""
    for ex in examples:
        prefer = ex.prefer or [[] for _ in ex.images]
        resolved = [index.resolve(ref, p) for ref, p in zip(ex.images, prefer)]
        if any(r is None for r in resolved):
            missing = ex.images[[r is None for r in resolved].index(True)]
            if strict:
                raise ContractError(root / "images", None, "image_id", f"example {ex.uid}: image {missing!r} not found")
            skipped += 1
            first_missing = first_missing or f"{ex.uid}: {missing}"
            continue
        keep.append(ex)
        refs.append(resolved)
    if not keep:
        raise ContractError(root / "images", None, "image_id",
                            f"no example's image is in this dataset (e.g. {first_missing}); featurize/import its images")  # fmt: skip
    if skipped:
        log.warning("%d examples skipped: image not in %s (e.g. %s)", skipped, root, first_missing)
    ids = sorted({i for r in refs for i in r})
    imageset = load_images(root, ids, max_regions)
    pos = {iid: k for k, iid in enumerate(ids)}
    tokens = tokenize(tokenizer, [ex.text for ex in keep], max_text_len)
    return TaskData(keep, [[pos[i] for i in r] for r in refs], tokens, imageset, skipped, first_missing)


@dataclass
class Prepared:
    """Everything a task's training and evaluation need, loaded once."""

    model: TaskModel
    tokenizer: Any
    train: TaskData
    eval: TaskData
    state: State
    device: torch.device
    ck_extra: dict[str, Any]
    max_text_len: int
    max_regions: int


def prepare(checkpoint: str, run: TaskRun, cfg: FinetuneConfig, task: Task, hp: TaskHyper,
            train_ex: list[Example], eval_ex: list[Example]) -> Prepared:  # fmt: skip
    """The encoder from `checkpoint`, the task's data on it, the task's state and head."""
    man = read_manifest(run.images)
    source = ModelSource(checkpoint, feature_dim=int(man.get("feature_dim") or 2048),
                         num_classes=len(man.get("tag_vocab") or []) or 80, model_path=cfg.model_path,
                         num_layers=cfg.base_layers, seed=cfg.base_seed)  # fmt: skip
    vl, ck_extra = load_model(source)
    max_text_len, max_regions = text_settings(ck_extra, cfg.max_text_len, cfg.max_regions)
    tokenizer = load_tokenizer(vl.cfg.model_path)
    train = prepare_data(train_ex, run.images, tokenizer, max_text_len, max_regions, cfg.strict)
    evald = prepare_data(eval_ex, run.eval_images or run.images, tokenizer, max_text_len, max_regions, cfg.strict)
    check_feature_dim(train.imageset, vl, Path(run.images) / "images")
    check_feature_dim(evald.imageset, vl, Path(run.eval_images or run.images) / "images")
    state = task.setup(hp, train)
    model = TaskModel(vl, task.head(vl, state))
    device = pick_device(cfg.device)
    model.to(device)
    return Prepared(model, tokenizer, train, evald, state, device, ck_extra, max_text_len, max_regions)


# ---------------------------------------------------------------- training


def train_task(task: Task, p: Prepared, hp: TaskHyper, cfg: FinetuneConfig) -> tuple[list[dict[str, float]], int, int]:
    """`hp.epochs` over the training data (or `hp.steps` steps, capped by `cfg.steps`), reshuffled
    each epoch; returns (per-step loss and lr, steps, steps per epoch)."""
    n_train = len(p.train.examples)
    per_epoch = max(1, math.ceil(n_train / hp.batch_size))
    total = max(1, hp.steps or hp.epochs * per_epoch)
    if cfg.steps:
        total = min(total, cfg.steps)
    opt = Optimizer.build(p.model, hp, total)
    rng = np.random.default_rng([cfg.seed, 0xF17E])
    history: list[dict[str, float]] = []
    p.model.train()
    perm = rng.permutation(n_train)
    for step in progress.track(range(total), desc=f"finetune {task.name}", unit="step"):
        b = step % per_epoch
        if b == 0 and step:
            perm = rng.permutation(n_train)
        idx = perm[b * hp.batch_size : (b + 1) * hp.batch_size]
        batch = task.collate(p.train, idx, p.tokenizer, p.state, rng)
        loss = task.loss(p.model(to_device(batch, p.device)), batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{task.name} step {step}: loss is {loss.item()}")
        opt.backward(loss)
        opt.update()
        history.append({"step": step, "loss": float(loss.item()), "lr": opt.lr})
        if cfg.log_every and (step % cfg.log_every == 0 or step == total - 1):
            log.info("%s step %d/%d loss %.4f", task.name, step + 1, total, history[-1]["loss"])
    return history, total, per_epoch


# ---------------------------------------------------------------- one task


def finetune_task(checkpoint: str, run: TaskRun, cfg: FinetuneConfig, log_to_mlflow: bool | None = None) -> dict[str, Any]:
    """Fine-tune `checkpoint` on one task and evaluate it; returns the task's metrics and figures."""
    t0 = time.perf_counter()
    task = get_task(run.task)
    hp = hyper(cfg, task.name)
    if not run.train or not run.eval or not run.images:
        raise ConfigError(f"{task.name}: train files, eval files and an images dataset dir are all required")
    # read (and validate) the task files before any model is loaded: a bad file fails early
    train_ex = read_task(task.name, run.train, run.format, hp.train_split)
    eval_ex = read_task(task.name, run.eval, run.format, hp.eval_split)
    task.check(train_ex + eval_ex)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    p = prepare(checkpoint, run, cfg, task, hp, train_ex, eval_ex)
    t_train = time.perf_counter()
    history, total, per_epoch = train_task(task, p, hp, cfg)
    train_s = time.perf_counter() - t_train
    p.model.eval()
    metrics = task.metric(p.model, p.eval, p.tokenizer, p.state, cfg.eval_batch_size, p.device)
    items = metrics.pop("per_item", None)
    result: dict[str, Any] = {
        "task": task.name,
        "headline": task.headline,
        "score": round(float(metrics[task.headline]), 4),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()},
        "n_train": len(p.train.examples),
        "n_eval_examples": len(p.eval.examples),
        "skipped_train": p.train.skipped,
        "skipped_eval": p.eval.skipped,
        "steps": total,
        "epochs": round(total / per_epoch, 3),
        "final_loss": history[-1]["loss"] if history else None,
        "checkpoint": str(checkpoint),
        "train_seconds": round(train_s, 2),
        "seconds": round(time.perf_counter() - t0, 2),
        **task.report(p.state),
    }
    if cfg.items and items is not None:
        result["items"] = items
    if log_to_mlflow if log_to_mlflow is not None else cfg.mlflow:
        params = {f"{task.name}.{k}": v for k, v in to_dict(hp).items()}
        params.update(task=task.name, checkpoint=str(checkpoint), train=",".join(run.train), eval=",".join(run.eval),
                      images=run.images, format=run.format, seed=cfg.seed, max_text_len=p.max_text_len,
                      max_regions=p.max_regions, steps_override=cfg.steps)  # fmt: skip
        info = _log_task(result, history, params, p.ck_extra, cfg)
        if info is not None:
            result["mlflow"] = info
    return result


def _log_task(result: dict[str, Any], history: list[dict[str, float]], params: dict[str, Any],
              ck_extra: dict[str, Any], cfg: FinetuneConfig) -> dict[str, str] | None:  # fmt: skip
    """The task's own new run, a child of the checkpoint's pre-training run: its params, per-step
    loss and metrics. Nothing is written into the parent (its tags and params describe the
    pre-training). None when tracking is off (`tracking_uri=none`)."""
    uri = _store(cfg, ck_extra)
    if uri is None:
        return None
    parent = parent_run_id(cfg.parent_run_id, ck_extra, uri, result["checkpoint"])
    task = result["task"]
    metrics = numeric({k: v for k, v in result.items() if k not in ("mlflow", "steps", "items")})
    return log_mlflow(uri, metrics=metrics, params=params, parent=parent, experiment=cfg.experiment, history=history,
                      run_name=f"finetune-{task}", tags={"raysys.stage": "finetune", "raysys.task": task})  # fmt: skip


def _store(cfg: FinetuneConfig, ck_extra: dict[str, Any]) -> str | None:
    """raysys.tracking's one rule; the checkpoint's recorded store before the default."""
    return tracking.resolve_tracking_uri(cfg.tracking_uri, None, recorded=ck_extra.get("tracking_uri"))


# ---------------------------------------------------------------- a suite of tasks


def with_meta_average(results: dict[str, Any]) -> dict[str, Any]:
    """Per-task results → `{tasks, scores, meta_average, meta_tasks}` (the meta-average over the
    paper's four tasks among them; None when none of them ran)."""
    scores = {t: r["score"] for t, r in results.items()}
    in_meta = [t for t in META_TASKS if t in scores]
    return {"tasks": results, "scores": scores, "meta_average": round(meta_average(scores), 4) if in_meta else None,
            "meta_tasks": in_meta}  # fmt: skip


def run_finetune(checkpoint: str, cfg: FinetuneConfig, runs: list[TaskRun] | None = None) -> dict[str, Any]:
    """Every run of the suite, then the meta-average over the paper's four tasks among them."""
    runs = runs if runs is not None else cfg.runs
    if not runs:
        raise ConfigError("finetune: no task to run (give --task with --train/--eval/--images, or `runs:` in the config)")
    results = {}
    for run in runs:
        r = finetune_task(checkpoint, run, cfg)
        results[r["task"]] = r
    out: dict[str, Any] = with_meta_average(results)
    if cfg.mlflow and out["meta_tasks"] and len(results) > 1:
        info = _log_meta(checkpoint, cfg, results, out)
        if info is not None:
            out["mlflow"] = info
    return out


def _log_meta(checkpoint: str, cfg: FinetuneConfig, results: dict[str, Any], out: dict[str, Any]) -> dict[str, str] | None:
    """The meta-average's own child run (beside the task runs, which its `raysys.run.<task>` tags
    name): its params are the suite's shared settings, its metrics the scores they produced."""
    extra = checkpoint_extra(checkpoint)
    uri = _store(cfg, extra)
    if uri is None:
        return None
    parent = parent_run_id(cfg.parent_run_id, extra, uri, checkpoint)
    children = {f"raysys.run.{t}": r["mlflow"]["run_id"] for t, r in results.items() if r.get("mlflow")}
    metrics = {"finetune.meta_average": out["meta_average"], **{f"finetune.{t}.score": v for t, v in out["scores"].items()}}
    params = {"finetune.tasks": sorted(results), "finetune.meta_tasks": out["meta_tasks"], "finetune.checkpoint": checkpoint,
              "finetune.steps_override": cfg.steps, "finetune.seed": cfg.seed}  # fmt: skip
    return log_mlflow(uri, metrics=metrics, params=params, parent=parent, experiment=cfg.experiment,
                      run_name="finetune-meta", tags={"raysys.stage": "finetune", **children})  # fmt: skip
