"""The downstream suite: every checkpoint fine-tuned on the same budget, scored on the same items.

Why: the paper ranks pre-training variants by their *fine-tuned* scores (the meta-average of VQA,
NLVR2, VE and RefCOCO+, 000 Tables 1-6). Zero-shot ITM retrieval cannot rank recipes that never
train the ITM head (`base`, `random_pairs`, `round_robin`, `paired_ratio`, subsets without I-S):
they score at chance by construction. The suite can: each task starts from the checkpoint's
encoder and trains its head (and the encoder) for the same number of steps, at the same learning
rate and batch size, whatever the recipe.

The tasks are the files a dataset lists in its manifest's `downstream` record — `raysys world`
writes them from the hidden truth of the gold "eval" images, which pre-training leaves out
(`tasks/<task>/{train,eval}.jsonl`, in the simple/lxmert formats of `raysys.evaluate.tasks`).
Fine-tuning is `raysys.evaluate.finetune` (the one generic loop); this module only fixes the
budget (`SuiteConfig`), finds the files, and keeps each evaluation item's score so that two
checkpoints can be compared with a paired bootstrap over items (`raysys report`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from raysys.config import ConfigError
from raysys.contract import read_manifest
from raysys.evaluate.downstream import checkpoint_extra, local_checkpoint
from raysys.evaluate.finetune import FinetuneConfig, TaskRun, run_finetune, with_meta_average
from raysys.evaluate.metrics import META_TASKS
from raysys.evaluate.tasks import get_task
from raysys.evaluate.tasks.nlvr2 import NLVR2Hyper
from raysys.evaluate.tasks.refcoco import RefCOCOHyper
from raysys.evaluate.tasks.retrieval import RetrievalHyper
from raysys.evaluate.tasks.ve import VEHyper
from raysys.evaluate.tasks.vqa import VQAHyper

log = logging.getLogger(__name__)

SUITE_TASKS = ("vqa", "nlvr2", "ve", "refcoco", "retrieval")


@dataclass
class SuiteConfig:
    """The fine-tuning budget (the same for every checkpoint compared) and where results go."""

    tasks: list[str] = field(default_factory=lambda: list(SUITE_TASKS))
    steps: int = 150  # optimizer steps per task
    lr: float = 1e-4
    batch_size: int = 32  # examples per step (retrieval: positives = batch_size // (1 + negatives))
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    retrieval_negatives: int = 2
    retrieval_eval_images: int = 40  # seeded sample of eval images scored I × T (0 = all)
    eval_batch_size: int = 64
    seed: int = 0  # fine-tuning seed (heads, batch order): fixed, so only the checkpoint differs
    # fine-tunings per task, with seeds seed … seed + repeats − 1; each eval item's score is their mean.
    # Why: one fine-tuning draw moves a task's score by several points (issue 17), and a bootstrap over
    # items cannot see that; averaging draws shrinks it, at `repeats` times the cost
    repeats: int = 1
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0 = torch's default)
    base_layers: int = 0  # `--checkpoint base`: keep the first N encoder layers (0 = all)
    # task -> {train: [files], eval: [files], format, train_split, eval_split, images, eval_images}: task
    # files beside (or instead of) the dataset's own suite, e.g. Flickr8k captions.tsv with train/dev
    # splits; `images` / `eval_images`: the featurized dataset dirs holding their photos (default: the
    # dataset; eval_images defaults to images), so held-out photos need not sit in the pre-training
    # dataset; relative paths are under the dataset dir
    task_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    log_every: int = 0
    mlflow: bool = False  # one MLflow run per task (params = the budget), nested under the checkpoint's run
    tracking_uri: str = ""
    experiment: str = "raysys"
    parent_run_id: str = ""

    def budget(self) -> dict[str, Any]:
        """What must be equal between two trials for their scores to compare."""
        keys = ("tasks", "steps", "lr", "batch_size", "warmup_ratio", "weight_decay", "retrieval_negatives",
                "retrieval_eval_images", "seed", "repeats", "task_files")  # fmt: skip
        return {k: getattr(self, k) for k in keys}


def downstream(data: str | Path, task_files: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dataset's suite record (manifest `downstream`) with `task_files` over it, or a one-line
    error saying how to get one."""
    rec = read_manifest(data).get("downstream")
    tasks = {**(rec.get("tasks") or {} if isinstance(rec, dict) else {}),
             **{get_task(k).name: v for k, v in (task_files or {}).items()}}  # fmt: skip
    if not tasks:
        raise ConfigError(f"{data}: no downstream suite in its manifest (write the world with tasks=true, "
                          "or name task files with suite.task_files)")  # fmt: skip
    return {**(rec if isinstance(rec, dict) else {}), "tasks": tasks}


def _files(data: Path, v: Any) -> list[str]:
    return [str(data / f) for f in ([v] if isinstance(v, str) else list(v or []))]


def suite_runs(data: str | Path, cfg: SuiteConfig) -> list[TaskRun]:
    """One `TaskRun` per task of `cfg.tasks`, on the files the dataset lists (or `task_files` names)."""
    data = Path(data)
    tasks = downstream(data, cfg.task_files)["tasks"]
    runs = []
    for name in cfg.tasks:
        task = get_task(name).name
        if task not in tasks:
            raise ConfigError(f"tasks: {name!r} is not in {data}'s suite; it has {sorted(tasks)}")
        t = tasks[task]
        images, eval_images = (str(data / t[k]) if t.get(k) else "" for k in ("images", "eval_images"))
        runs.append(TaskRun(task, _files(data, t.get("train")), _files(data, t.get("eval")), images or str(data),
                            eval_images, t.get("format", "auto")))  # fmt: skip
    return runs


def finetune_config(cfg: SuiteConfig) -> FinetuneConfig:
    """The generic loop's config carrying the budget: every task gets the same steps, lr and batch."""
    common = {"lr": cfg.lr, "steps": cfg.steps, "epochs": 0, "batch_size": cfg.batch_size,
              "warmup_ratio": cfg.warmup_ratio, "weight_decay": cfg.weight_decay}  # fmt: skip
    files = {get_task(k).name: v for k, v in cfg.task_files.items()}

    def hp(task: str) -> dict[str, Any]:
        f = files.get(task, {})
        return {**common, "train_split": str(f.get("train_split", "")), "eval_split": str(f.get("eval_split", ""))}

    positives = max(1, cfg.batch_size // (1 + cfg.retrieval_negatives))
    return FinetuneConfig(
        vqa=VQAHyper(**hp("vqa"), num_answers=0),
        nlvr2=NLVR2Hyper(**hp("nlvr2")),
        ve=VEHyper(**hp("ve")),
        refcoco=RefCOCOHyper(**hp("refcoco")),
        retrieval=RetrievalHyper(**{**hp("retrieval"), "batch_size": positives}, negatives=cfg.retrieval_negatives,
                                 eval_max_images=cfg.retrieval_eval_images),  # fmt: skip
        steps=cfg.steps, eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, device=cfg.device, threads=cfg.threads,
        base_layers=cfg.base_layers, log_every=cfg.log_every, items=True, mlflow=cfg.mlflow,
        tracking_uri=cfg.tracking_uri, experiment=cfg.experiment, parent_run_id=cfg.parent_run_id,
    )  # fmt: skip


def run_suite(checkpoint: str | Path, data: str | Path, cfg: SuiteConfig) -> dict[str, Any]:
    """Fine-tune `checkpoint` on each task's train split and score its eval split.

    Returns `meta_average` (over the paper's four tasks among those run), `scores` (task → headline,
    percent), `metrics` (`<task>.<metric>` → value), `items` (task → {ids, scores}: each eval
    item's own score), `budget` and `tasks` (the full per-task results)."""
    t0 = time.perf_counter()
    if cfg.repeats < 1:
        raise ConfigError(f"suite.repeats: {cfg.repeats} is not a positive count of fine-tunings")
    runs = suite_runs(data, cfg)
    with local_checkpoint(checkpoint) as ck:
        pre = (checkpoint_extra(ck).get("pretrain_config") or {}) if ck != "base" else {}
        if pre.get("exclude_eval") is False:
            log.warning("%s was pre-trained with exclude_eval=false: the suite's images were in pre-training", ck)
        out = _mean_over_repeats([run_finetune(ck, finetune_config(replace(cfg, seed=cfg.seed + k)), runs)
                                  for k in range(cfg.repeats)])  # fmt: skip
    metrics: dict[str, float] = {}
    items: dict[str, dict[str, list]] = {}
    for task, r in out["tasks"].items():
        items[task] = r.pop("items", {"ids": [], "scores": []})
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("steps", "score"):
                metrics[f"{task}.{k}"] = float(v)
    return {
        "meta_average": out["meta_average"],
        "meta_tasks": out["meta_tasks"],
        "scores": out["scores"],
        "headlines": {t: r["headline"] for t, r in out["tasks"].items()},
        "metrics": metrics,
        "items": items,
        "budget": cfg.budget(),
        "checkpoint": str(checkpoint),
        "seconds": round(time.perf_counter() - t0, 1),
        "tasks": out["tasks"],
    }


def _mean_over_repeats(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """One `run_finetune` result from several fine-tuning draws: each item's score, each task's
    numbers and the meta-average are means over the draws; `repeat_scores` keeps each draw's score."""
    if len(outs) == 1:
        return outs[0]
    tasks: dict[str, Any] = {}
    for task, first in outs[0]["tasks"].items():
        rs = [o["tasks"][task] for o in outs]
        merged = {k: (round(sum(r[k] for r in rs) / len(rs), 4) if isinstance(v, float) else v) for k, v in first.items()}
        merged["seconds"] = round(sum(r["seconds"] for r in rs), 2)
        merged["repeat_scores"] = [r["score"] for r in rs]
        if "items" in first:
            ids = first["items"]["ids"]
            if any(r["items"]["ids"] != ids for r in rs):
                raise RuntimeError(f"{task}: the repeats scored different eval items")
            merged["items"] = {"ids": ids, "scores": [sum(v) / len(rs) for v in zip(*(r["items"]["scores"] for r in rs))]}
        tasks[task] = merged
    return with_meta_average(tasks)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The compact JSON line: `meta_average`, one key per task (its headline score), the budget."""
    n_eval = {t: len(result["items"].get(t, {}).get("scores", [])) for t in result["scores"]}
    return {"meta_average": result["meta_average"], **result["scores"], "n_eval": n_eval,
            "steps": result["budget"]["steps"], "seconds": result["seconds"]}  # fmt: skip


def format_scores(result: dict[str, Any]) -> str:
    """One line per task, then the meta-average."""
    lines = []
    for t, r in result["tasks"].items():
        lines.append(f"{t:<10} {r['headline']:<13} {r['score']:6.2f}  (train {r['n_train']}, eval {r['n_eval_examples']}, "
                     f"{r['steps']} steps, {r['seconds']} s)")  # fmt: skip
    if result["meta_average"] is not None:
        lines.append(f"meta-average over {result['meta_tasks']}: {result['meta_average']:.2f}")
    return "\n".join(lines)


def items_doc(result: dict[str, Any]) -> dict[str, Any]:
    """Each eval item's score per task, with the headline names and the budget: the artifact a sweep
    trial logs (`suite_items.json`), from which `raysys report` bootstraps differences between trials."""
    return {"budget": result["budget"], "headlines": result["headlines"], "meta_tasks": list(META_TASKS),
            "items": result["items"], "scores": result["scores"], "meta_average": result["meta_average"]}  # fmt: skip


def write_items(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items_doc(result)))
    return path


__all__ = ["SUITE_TASKS", "SuiteConfig", "downstream", "finetune_config", "format_scores", "items_doc",
           "run_suite", "suite_runs", "summary", "write_items"]  # fmt: skip
