"""Fine-tuning on the downstream tasks (paper 000 appendix C; 001 appendix A) and the meta-average.

One loop for every task; what differs is the head and the loss, as in the papers:

| task | input | head | loss | metric (percent) |
|---|---|---|---|---|
| `vqa` | [question, image] | MLP on [CLS] → answer vocabulary (3,129 most frequent by default) | BCE on soft scores (the answer's own VQA accuracy: 0.3/0.6/0.9/1) | official VQA accuracy |
| `nlvr2` | [sentence, left] and [sentence, right] | MLP on the two [CLS] vectors concatenated | CE, 2-way | accuracy |
| `ve` | [hypothesis, image] | MLP on [CLS] | CE, 3-way | accuracy |
| `refcoco` | [expression, image regions] | MLP on every region's output → a score | BCE per region (IoU > 0.5 with the gold box = positive) | accuracy: IoU(best region, gold) > 0.5 |
| `retrieval` | [caption, image] | the pre-training ITM head | CE, each positive with `negatives` sampled mismatched pairs | R@1/5/10 both ways; headline mean recall |

Heads are UNITER's (Linear → GELU → LayerNorm → Linear). The optimiser is pre-training's (AdamW,
no decay on biases and LayerNorms, linear warm-up over `warmup_ratio` of the steps then linear
decay). Hyper-parameters default to the papers' values (000 App. C for VQA, NLVR2, VE, RefCOCO+ —
RefCOCO+'s batch size, which 000 omits, from 001 App. A; 001 App. A for retrieval), each a config
field (`vqa.lr=1e-4`); `steps=N` caps every task at N optimizer steps for smoke runs.

Meta-average: the unweighted mean of the headline scores of VQA, NLVR2, VE and RefCOCO+ among the
tasks run (`raysys.evaluate.metrics.meta_average`, which reproduces the paper's Meta-Ave column).

MLflow: each task is a new run tagged `raysys.parent_run_id` (and `mlflow.parentRunId`) = the
checkpoint's pre-training run, holding the task's params, per-step loss and metrics; the headline
metrics and the meta-average are also written into the parent run as `finetune.<task>.<metric>`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- configuration


@dataclass
class TaskHyper:
    """Optimisation of one task. `steps` > 0 replaces `epochs`."""

    lr: float = 5e-5
    epochs: int = 1
    batch_size: int = 32
    steps: int = 0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0 = off
    train_split: str = ""  # keep only this split when the format carries splits ("" = all)
    eval_split: str = ""


@dataclass
class VQAHyper(TaskHyper):
    lr: float = 6e-5  # 000 App. C
    epochs: int = 20
    batch_size: int = 480
    num_answers: int = 3129  # the most frequent training answers (000 App. C, following BUTD)
    answer_vocab: str = ""  # a fixed vocabulary file (JSON list, ans2label dict, or one per line)


@dataclass
class NLVR2Hyper(TaskHyper):
    lr: float = 3e-5  # 000 App. C
    epochs: int = 8
    batch_size: int = 60


@dataclass
class VEHyper(TaskHyper):
    lr: float = 8e-5  # 000 App. C
    epochs: int = 4
    batch_size: int = 480


@dataclass
class RefCOCOHyper(TaskHyper):
    lr: float = 2e-4  # 000 App. C
    epochs: int = 20
    batch_size: int = 32  # 001 App. A (000 does not say)
    iou_threshold: float = 0.5  # a region is correct when IoU with the gold box > this
    train_split: str = "train"  # RefCOCO+ (unc) splits: train, val, testA, testB
    eval_split: str = "val"


@dataclass
class RetrievalHyper(TaskHyper):
    lr: float = 5e-5  # 001 App. A (Flickr30K)
    epochs: int = 0
    steps: int = 5000
    batch_size: int = 8  # positives per batch; each brings `negatives` mismatched pairs
    negatives: int = 2  # UNITER: two sampled negatives per positive (half wrong image, half wrong caption)
    eval_max_images: int = 0  # 0 = every eval image (full I × T ITM scoring)


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
    mlflow: bool = True
    tracking_uri: str = ""
    experiment: str = "raysys"
    parent_run_id: str = ""  # "" = the run recorded in the checkpoint


def hyper(cfg: FinetuneConfig, task: str) -> TaskHyper:
    return getattr(cfg, task)


# ---------------------------------------------------------------- heads


def _mlp(inp: int, hidden: int, out: int, eps: float):
    from torch import nn

    return nn.Sequential(nn.Linear(inp, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps), nn.Linear(hidden, out))


def build_task_model(vl, task: str, n_out: int):
    """The pre-trained encoder plus the task's head (UNITER's heads)."""
    import torch
    from torch import nn

    class TaskModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.vl = vl
            H, eps = vl.hidden_size, vl.lm.config.layer_norm_eps
            self.task = task
            if task == "vqa":
                self.head = _mlp(H, 2 * H, n_out, eps)
            elif task == "nlvr2":
                self.head = _mlp(2 * H, 2 * H, 2, eps)
            elif task == "ve":
                self.head = _mlp(H, 2 * H, 3, eps)
            elif task == "refcoco":
                self.head = _mlp(H, H, 1, eps)
            else:  # retrieval: the ITM head of pre-training
                self.head = nn.Identity()
            for m in self.head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=vl.lm.config.initializer_range)
                    nn.init.zeros_(m.bias)

        def forward(self, batch: dict[str, Any]) -> torch.Tensor:
            text_h, region_h = self.vl.encode(batch)
            pooled = self.vl.pool(text_h, region_h, batch)
            if self.task == "nlvr2":  # rows 2b, 2b+1 are the same sentence with the left/right image
                return self.head(pooled.reshape(-1, 2 * pooled.shape[-1]))
            if self.task == "refcoco":
                logits = self.head(region_h).squeeze(-1)
                return logits.masked_fill(~batch["region_mask"], float("-inf"))
            if self.task == "retrieval":
                return self.vl.itm_head(pooled)
            return self.head(pooled)

    return TaskModel()


# ---------------------------------------------------------------- data


@dataclass
class TaskData:
    """Examples with resolved images and pre-tokenised texts."""

    examples: list[Any]
    images: list[list[int]]  # per example: indices into `imageset`
    tokens: list[np.ndarray]
    imageset: Any  # raysys.evaluate.downstream.ImageSet
    skipped: int = 0
    skipped_example: str = ""


def prepare_data(examples, root: str | Path, tokenizer, max_text_len: int, max_regions: int, strict: bool) -> TaskData:
    from raysys.contract import ContractError
    from raysys.evaluate.downstream import ImageIndex, image_ids, load_images, tokenize

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


def build_answer_vocab(train: list[Any], hp: VQAHyper) -> list[str]:
    """The fixed vocabulary file, else the `num_answers` most frequent (normalised) human answers
    of the training data (ties alphabetical, so the vocabulary is deterministic)."""
    import json
    from collections import Counter

    from raysys.evaluate.metrics import normalize_answer

    if hp.answer_vocab:
        p = Path(hp.answer_vocab)
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            d = json.loads(text)
            vocab = sorted(d, key=lambda a: d[a]) if isinstance(d, dict) else list(d)
        else:
            vocab = [line.strip() for line in text.splitlines() if line.strip()]
        return vocab[: hp.num_answers] if hp.num_answers else vocab
    counts = Counter(normalize_answer(a) for ex in train for a in (ex.label or []))
    ranked = sorted(counts, key=lambda a: (-counts[a], a))
    return ranked[: hp.num_answers] if hp.num_answers else ranked


# ---------------------------------------------------------------- batches per task


def make_batch(task: str, data: TaskData, idx: np.ndarray, tokenizer, extra: dict[str, Any], rng=None) -> dict[str, Any]:
    """Inputs and targets of examples `idx` for `task`."""
    import torch

    from raysys.evaluate.downstream import pair_batch
    from raysys.evaluate.metrics import iou

    exs = [data.examples[int(i)] for i in idx]
    if task == "nlvr2":
        toks = [data.tokens[int(i)] for i in idx for _ in range(2)]
        imgs = [data.images[int(i)][s] for i in idx for s in range(2)]
        batch = pair_batch(data.imageset, tokenizer, toks, imgs)
        batch["labels"] = torch.tensor([ex.label for ex in exs], dtype=torch.long)
        return batch
    if task == "retrieval" and rng is not None:  # training: positives + sampled negatives
        toks, imgs, labels = [], [], []
        n_img = data.imageset.n_images
        caps_of = extra["captions_of_image"]
        all_caps = len(data.examples)
        for i in idx:
            i = int(i)
            img = data.images[i][0]
            toks.append(data.tokens[i])
            imgs.append(img)
            labels.append(1)
            for k in range(extra["negatives"]):
                if k % 2 == 0 and n_img > 1:  # wrong image
                    other = int(rng.integers(0, n_img - 1))
                    toks.append(data.tokens[i])
                    imgs.append(other + (other >= img))
                else:  # wrong caption (any caption not of this image)
                    own = caps_of[img]
                    if len(own) >= all_caps:
                        continue
                    j = int(rng.integers(0, all_caps))
                    while j in own:
                        j = int(rng.integers(0, all_caps))
                    toks.append(data.tokens[j])
                    imgs.append(img)
                labels.append(0)
        batch = pair_batch(data.imageset, tokenizer, toks, imgs)
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch
    batch = pair_batch(data.imageset, tokenizer, [data.tokens[int(i)] for i in idx], [data.images[int(i)][0] for i in idx])
    if task == "vqa":
        vocab_index = extra["vocab_index"]
        target = np.zeros((len(exs), len(vocab_index)), np.float32)
        from raysys.evaluate.metrics import vqa_soft_scores

        for b, ex in enumerate(exs):
            for a, s in vqa_soft_scores(ex.label or []).items():
                if a in vocab_index:
                    target[b, vocab_index[a]] = s
        batch["labels"] = torch.from_numpy(target)
    elif task == "ve":
        batch["labels"] = torch.tensor([ex.label for ex in exs], dtype=torch.long)
    elif task == "refcoco":
        R = batch["region_mask"].shape[1]
        target = np.zeros((len(exs), R), np.float32)
        for b, (i, ex) in enumerate(zip(idx, exs)):
            boxes = data.imageset.image_boxes(data.images[int(i)][0])
            target[b, : len(boxes)] = iou(boxes, ex.label) > extra["iou_threshold"]
        batch["labels"] = torch.from_numpy(target)
    return batch


def task_loss(task: str, logits, batch):
    import torch.nn.functional as F

    labels = batch["labels"].to(logits.device)
    if task == "vqa":  # UNITER scales the mean BCE by the vocabulary size (a sum over answers)
        return F.binary_cross_entropy_with_logits(logits, labels) * labels.shape[1]
    if task == "refcoco":
        mask = batch["region_mask"].to(logits.device)
        safe = logits.masked_fill(~mask, 0.0)
        per = F.binary_cross_entropy_with_logits(safe, labels, reduction="none")
        return (per * mask).sum() / mask.sum().clamp(min=1)
    return F.cross_entropy(logits, labels)


# ---------------------------------------------------------------- evaluation per task


def evaluate_task(task: str, model, data: TaskData, tokenizer, extra: dict[str, Any], batch_size: int, device,
                  tie_policy: str = "pessimistic") -> dict[str, Any]:  # fmt: skip
    import torch

    from raysys.evaluate.downstream import to_device
    from raysys.evaluate.metrics import accuracy, gold_ranks, iou, rank_summary, vqa_accuracy

    model.eval()
    n = len(data.examples)
    if task == "retrieval":
        from raysys.evaluate.zeroshot import score_pairs

        img_of = np.array([data.images[i][0] for i in range(n)], np.int64)
        images = np.unique(img_of)
        if extra.get("eval_max_images") and extra["eval_max_images"] < len(images):
            images = np.sort(np.random.default_rng(0).choice(images, extra["eval_max_images"], replace=False))
        texts = np.flatnonzero(np.isin(img_of, images))
        pi, pt = np.meshgrid(images, texts, indexing="ij")
        with torch.inference_mode():
            s = score_pairs(model.vl, data.imageset, tokenizer, data.tokens, pi.ravel(), pt.ravel(), batch_size, device)
        S = s.reshape(len(images), len(texts))
        gold = img_of[texts][None, :] == images[:, None]
        out = {}
        out.update(rank_summary(gold_ranks(S, gold, tie_policy), "i2t"))
        out.update(rank_summary(gold_ranks(S.T, gold.T, tie_policy), "t2i"))
        out["r_mean"] = float(np.mean([out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]))
        out.update(n_images=len(images), n_texts=len(texts))
        return out
    preds: list[Any] = []
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, min(n, lo + batch_size))
            batch = make_batch(task, data, idx, tokenizer, extra)
            logits = model(to_device(batch, device)).float().cpu()
            if task == "refcoco":
                best = logits.argmax(dim=1).numpy()
                for i, r in zip(idx, best):
                    preds.append(data.imageset.image_boxes(data.images[int(i)][0])[int(r)])
            else:
                preds.extend(logits.argmax(dim=1).tolist())
    if task == "vqa":
        vocab = extra["vocab"]
        accs = [vqa_accuracy(vocab[p], ex.label) for p, ex in zip(preds, data.examples)]
        # the best any prediction from this vocabulary could score: how much the vocabulary costs
        upper = [max((vqa_accuracy(a, ex.label) for a in _candidates(ex.label, extra["vocab_index"])), default=0.0)
                 for ex in data.examples]  # fmt: skip
        return {"vqa_accuracy": 100.0 * float(np.mean(accs)), "n_eval": n, "vocab_upper_bound": 100.0 * float(np.mean(upper))}
    if task == "refcoco":
        hits = [iou(p, ex.label) > extra["iou_threshold"] for p, ex in zip(preds, data.examples)]
        upper = [bool((iou(data.imageset.image_boxes(data.images[i][0]), ex.label) > extra["iou_threshold"]).any())
                 for i, ex in enumerate(data.examples)]  # fmt: skip
        return {"accuracy": 100.0 * float(np.mean(hits)), "n_eval": n, "proposal_upper_bound": 100.0 * float(np.mean(upper))}
    labels = np.array([ex.label for ex in data.examples])
    return {"accuracy": accuracy(np.array(preds), labels), "n_eval": n}


def _candidates(answers: list[str], vocab_index: dict[str, int]) -> list[str]:
    from raysys.evaluate.metrics import normalize_answer

    return [a for a in {normalize_answer(x) for x in answers} if a in vocab_index]


# ---------------------------------------------------------------- one task


def finetune_task(checkpoint: str, run: TaskRun, cfg: FinetuneConfig, log_to_mlflow: bool | None = None) -> dict[str, Any]:
    """Fine-tune `checkpoint` on one task and evaluate it; returns the task's metrics and figures."""
    from raysys.config import ConfigError, to_dict
    from raysys.evaluate.tasks import get_task, read_task

    t0 = time.perf_counter()
    spec = get_task(run.task)
    task = spec.name
    hp = hyper(cfg, task)
    if not run.train or not run.eval or not run.images:
        raise ConfigError(f"{task}: train files, eval files and an images dataset dir are all required")
    # read (and validate) the task files before the heavy imports: a bad file fails in a second
    train_ex = read_task(task, run.train, run.format, hp.train_split)
    eval_ex = read_task(task, run.eval, run.format, hp.eval_split)
    if task == "vqa" and any(ex.label is None for ex in train_ex + eval_ex):
        raise ConfigError("vqa: train and eval need the annotations file next to the questions file")

    import torch

    from raysys.contract import read_manifest
    from raysys.evaluate.downstream import (
        ModelSource,
        check_feature_dim,
        load_model,
        pick_device,
        text_settings,
        to_device,
    )
    from raysys.pretrain.loop import make_optimizer
    from raysys.pretrain.model import load_tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

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

    extra: dict[str, Any] = {}
    n_out = 0
    if task == "vqa":
        vocab = build_answer_vocab(train.examples, hp)
        extra.update(vocab=vocab, vocab_index={a: i for i, a in enumerate(vocab)})
        n_out = len(vocab)
    elif task == "refcoco":
        extra["iou_threshold"] = hp.iou_threshold
    elif task == "retrieval":
        caps: dict[int, set[int]] = {}
        for i, r in enumerate(train.images):
            caps.setdefault(r[0], set()).add(i)
        extra.update(captions_of_image=caps, negatives=hp.negatives, eval_max_images=hp.eval_max_images)
    model = build_task_model(vl, task, n_out)
    device = pick_device(cfg.device)
    model.to(device)

    n_train = len(train.examples)
    per_epoch = max(1, math.ceil(n_train / hp.batch_size))
    total = max(1, hp.steps or hp.epochs * per_epoch)
    if cfg.steps:
        total = min(total, cfg.steps)
    opt, sched = make_optimizer(model, hp, total)
    rng = np.random.default_rng([cfg.seed, 0xF17E])
    history: list[dict[str, float]] = []
    model.train()
    t_train = time.perf_counter()
    perm = rng.permutation(n_train)
    for step in range(total):
        b = step % per_epoch
        if b == 0 and step:
            perm = rng.permutation(n_train)
        idx = perm[b * hp.batch_size : (b + 1) * hp.batch_size]
        batch = make_batch(task, train, idx, tokenizer, extra, rng)
        logits = model(to_device(batch, device))
        loss = task_loss(task, logits, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{task} step {step}: loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hp.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        opt.step()
        sched.step()
        history.append({"step": step, "loss": float(loss.item()), "lr": float(sched.get_last_lr()[0])})
        if cfg.log_every and (step % cfg.log_every == 0 or step == total - 1):
            log.info("%s step %d/%d loss %.4f", task, step + 1, total, history[-1]["loss"])
    train_s = time.perf_counter() - t_train
    metrics = evaluate_task(task, model, evald, tokenizer, extra, cfg.eval_batch_size, device)
    result: dict[str, Any] = {
        "task": task,
        "headline": spec.headline,
        "score": round(float(metrics[spec.headline]), 4),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()},
        "n_train": n_train,
        "n_eval_examples": len(evald.examples),
        "skipped_train": train.skipped,
        "skipped_eval": evald.skipped,
        "steps": total,
        "epochs": round(total / per_epoch, 3),
        "final_loss": history[-1]["loss"] if history else None,
        "checkpoint": str(checkpoint),
        "train_seconds": round(train_s, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if task == "vqa":
        result["num_answers"] = n_out
    if log_to_mlflow if log_to_mlflow is not None else cfg.mlflow:
        params = {f"{task}.{k}": v for k, v in to_dict(hp).items()}
        params.update(task=task, checkpoint=str(checkpoint), train=",".join(run.train), eval=",".join(run.eval),
                      images=run.images, format=run.format, seed=cfg.seed, max_text_len=max_text_len,
                      max_regions=max_regions, steps_override=cfg.steps)  # fmt: skip
        result["mlflow"] = _log_task(result, history, params, ck_extra, cfg)
    return result


def _log_task(result: dict[str, Any], history: list[dict[str, float]], params: dict[str, Any],
              ck_extra: dict[str, Any], cfg: FinetuneConfig) -> dict[str, str]:  # fmt: skip
    """A new run linked to the checkpoint's run (per-step loss, params, metrics), plus the task's
    headline metrics copied into the parent run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from raysys.evaluate.downstream import log_mlflow, numeric, parent_run_id, tracking_uri

    uri = tracking_uri(cfg.tracking_uri, ck_extra)
    parent = parent_run_id(cfg.parent_run_id, ck_extra)
    task = result["task"]
    metrics = numeric({k: v for k, v in result.items() if k not in ("mlflow", "steps")})
    info = log_mlflow(uri, metrics=metrics, params=params, parent=parent, experiment=cfg.experiment,
                      run_name=f"finetune-{task}", tags={"raysys.stage": "finetune", "raysys.task": task})  # fmt: skip
    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    steps = [Metric(k, v, now, int(h["step"])) for h in history for k, v in h.items() if k != "step"]
    for i in range(0, len(steps), 1000):
        client.log_batch(info["run_id"], metrics=steps[i : i + 1000])
    if parent:
        log_mlflow(uri, metrics={f"finetune.{task}.{result['headline']}": float(result["score"])}, run_id=parent)
    return info


# ---------------------------------------------------------------- a suite of tasks


def run_finetune(checkpoint: str, cfg: FinetuneConfig, runs: list[TaskRun] | None = None) -> dict[str, Any]:
    """Every run of the suite, then the meta-average over the paper's four tasks among them."""
    from raysys.config import ConfigError
    from raysys.evaluate.metrics import META_TASKS, meta_average

    runs = runs if runs is not None else cfg.runs
    if not runs:
        raise ConfigError("finetune: no task to run (give --task with --train/--eval/--images, or `runs:` in the config)")
    results = {}
    for run in runs:
        r = finetune_task(checkpoint, run, cfg)
        results[r["task"]] = r
    scores = {t: r["score"] for t, r in results.items()}
    out: dict[str, Any] = {"tasks": results, "scores": scores}
    in_meta = [t for t in META_TASKS if t in scores]
    out["meta_average"] = round(meta_average(scores), 4) if in_meta else None
    out["meta_tasks"] = in_meta
    if cfg.mlflow and in_meta and len(results) > 1:
        from raysys.evaluate.downstream import checkpoint_extra, log_mlflow, parent_run_id, tracking_uri

        extra = checkpoint_extra(checkpoint)
        parent = parent_run_id(cfg.parent_run_id, extra)
        uri = tracking_uri(cfg.tracking_uri, extra)
        children = {f"raysys.run.{t}": r["mlflow"]["run_id"] for t, r in results.items() if r.get("mlflow")}
        metrics = {"finetune.meta_average": out["meta_average"], **{f"finetune.{t}.score": v for t, v in scores.items()}}
        if parent:
            out["mlflow"] = log_mlflow(uri, metrics=metrics, run_id=parent)
        else:  # no pre-training run to report to: one summary run beside the task runs
            out["mlflow"] = log_mlflow(uri, metrics=metrics, experiment=cfg.experiment, run_name="finetune-meta",
                                       tags={"raysys.stage": "finetune", **children})  # fmt: skip
    return out
