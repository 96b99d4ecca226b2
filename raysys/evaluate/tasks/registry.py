"""The task seam: a downstream task is one `Task` registered by name.

A task says how to read its files (readers, one per format, and a detector), how much to train
(its `TaskHyper` defaults), what state it derives from the training data (VQA's answer vocabulary),
its head on top of the pre-trained encoder, how it batches examples, its loss and its metric. The
fine-tuning loop (`raysys.evaluate.finetune`) knows nothing else about a task, so a new task is one
module that calls `register_task` — inside the package or in a plugin (`raysys --plugin`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from raysys.config import ConfigError
from raysys.contract import ContractError


@dataclass
class Example:
    """One task example before images are resolved."""

    uid: str
    images: list[str]  # image references as the file names them (NLVR2: [left, right])
    text: str
    label: Any = None  # vqa: list of answers; nlvr2: 0/1; ve: 0/1/2; refcoco: [x1, y1, x2, y2]
    prefer: list[list[str]] = field(default_factory=list)  # other spellings of each image, tried first
    meta: dict[str, Any] = field(default_factory=dict)


Reader = Callable[[list[Path], str], list[Example]]


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
class TaskData:
    """Examples with resolved images and pre-tokenised texts."""

    examples: list[Any]
    images: list[list[int]]  # per example: indices into `imageset`
    tokens: list[np.ndarray]
    imageset: Any  # raysys.evaluate.downstream.ImageSet
    skipped: int = 0
    skipped_example: str = ""


class Encoded(NamedTuple):
    """What a head sees: the encoder's outputs for one batch, and the encoder itself (for a head
    that reuses a pre-training head, as retrieval reuses ITM)."""

    text: torch.Tensor  # (B, T, H)
    regions: torch.Tensor  # (B, R, H)
    pooled: torch.Tensor  # (B, H): `VLModel.pool`
    vl: nn.Module


State = dict[str, Any]  # what a task derives from its training data and settings (`Task.setup`)
# (data, example indices, tokenizer, state, rng) -> batch with "labels"; rng None = an evaluation batch
Collate = Callable[[TaskData, np.ndarray, Any, State, "np.random.Generator | None"], dict[str, Any]]
# (model, data, tokenizer, state, batch_size, device) -> metrics, the headline among them; the model is
# raysys.evaluate.finetune.TaskModel in eval mode (`.vl` the encoder, `.head` the task's head)
Metric = Callable[[nn.Module, TaskData, Any, State, int, torch.device], dict[str, Any]]


def _no_state(hp: TaskHyper, train: TaskData) -> State:
    return {}


def _no_check(examples: list[Example]) -> None:
    return None


def _no_report(state: State) -> dict[str, Any]:
    return {}


@dataclass
class Task:
    """A downstream task: how to read it, how to fine-tune it and what it reports."""

    name: str
    headline: str  # the metric that enters the meta-average (percent)
    formats: dict[str, Reader]
    detect: Callable[[list[Path]], str]
    head: Callable[[nn.Module, State], nn.Module]  # (encoder, state) -> a module called as head(Encoded, batch)
    collate: Collate
    loss: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]  # (logits, batch) -> scalar
    metric: Metric
    hyper: type[TaskHyper] = TaskHyper  # defaults when FinetuneConfig has no section for the task
    setup: Callable[[TaskHyper, TaskData], State] = _no_state
    check: Callable[[list[Example]], None] = _no_check  # train + eval examples, before any model is loaded
    report: Callable[[State], dict[str, Any]] = _no_report  # extra keys of the task's result
    labels: tuple[str, ...] = ()
    images_per_example: int = 1


TASKS: dict[str, Task] = {}
ALIASES = {"vqav2": "vqa", "vqa2": "vqa", "snli-ve": "ve", "snli_ve": "ve", "visual_entailment": "ve",
           "refcoco+": "refcoco", "refcocoplus": "refcoco", "flickr30k": "retrieval", "itm": "retrieval"}  # fmt: skip


def register_task(task: Task) -> Task:
    """Make `task` known by its name (a later registration of the same name replaces it)."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ConfigError(f"task: unknown {name!r}; known: {sorted(TASKS)} (aliases {sorted(ALIASES)})")
    return TASKS[key]


def read_task(task: str, files: list[str | os.PathLike], fmt: str = "auto", split: str = "") -> list[Example]:
    """Read task files with the named format (or the detected one); `split` keeps only examples of
    that split when the format carries splits (RefCOCO refs, Karpathy JSON, Flickr8k)."""
    spec = get_task(task)
    paths = [Path(f) for f in files]
    if not paths:
        raise ConfigError(f"{spec.name}: no input files")
    for p in paths:
        if not p.exists():
            raise ContractError(p, None, "file", "no such file")
    fmt = spec.detect(paths) if fmt in ("", "auto") else fmt
    if fmt not in spec.formats:
        raise ConfigError(f"{spec.name}: unknown format {fmt!r}; known: {sorted(spec.formats)}")
    examples = spec.formats[fmt](paths, split)
    if not examples:
        raise ContractError(paths[0], None, "examples", f"no {spec.name} examples" + (f" in split {split!r}" if split else ""))
    return examples
