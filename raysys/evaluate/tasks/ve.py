"""SNLI-VE (paper 000 App. C): [hypothesis, image] → an MLP on the pooled vector, 3-way
cross-entropy (entailment / neutral / contradiction), accuracy.

Formats: `official` — JSONL (`Flickr30K_ID`, `sentence2`, `gold_label`); `simple` —
`{image, hypothesis, label}`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from raysys.contract import ContractError
from raysys.evaluate.tasks.common import (
    Head,
    classify_accuracy,
    classify_collate,
    cross_entropy,
    mlp_head,
    on_pooled,
)
from raysys.evaluate.tasks.formats import get_field, json_rows, load_jsonl, peek
from raysys.evaluate.tasks.registry import Example, State, Task, TaskHyper, register_task

VE_LABELS = ("entailment", "neutral", "contradiction")


@dataclass
class VEHyper(TaskHyper):
    lr: float = 8e-5  # 000 App. C
    epochs: int = 4
    batch_size: int = 480


# ---------------------------------------------------------------- readers


def _ve_label(v: Any, path: Path, row: int) -> int:
    if isinstance(v, str) and v.strip().lower() in VE_LABELS:
        return VE_LABELS.index(v.strip().lower())
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 3:
        return v
    raise ContractError(path, row, "gold_label", f"{v!r} is not one of {list(VE_LABELS)}")


def read_ve_official(files: list[Path], split: str = "") -> list[Example]:
    """SNLI-VE JSONL (`snli_ve_{train,dev,test}.jsonl`): the premise is the Flickr30k image
    `Flickr30K_ID`, the hypothesis `sentence2`, the label `gold_label`."""
    out = []
    for p in files:
        for n, r in load_jsonl(p):
            img = get_field(r, ("Flickr30K_ID",), p, n, (str, int))
            text = get_field(r, ("sentence2",), p, n, str)
            label = _ve_label(get_field(r, ("gold_label",), p, n, str), p, n)
            uid = str(r.get("pairID") or f"{p.stem}:{n}")
            out.append(Example(uid, [str(img)], text, label, [[f"{img}.jpg"]], {}))
    return out


def read_ve_simple(files: list[Path], split: str = "") -> list[Example]:
    out = []
    for p in files:
        for n, r in json_rows(p):
            img = get_field(r, ("image", "image_id"), p, n, (str, int))
            text = get_field(r, ("hypothesis", "sentence"), p, n, str)
            label = _ve_label(get_field(r, ("label", "gold_label"), p, n, (str, int)), p, n)
            out.append(Example(str(r.get("id", f"{p.stem}:{n}")), [str(img)], text, label, [[]], {}))
    return out


def _detect_ve(files: list[Path]) -> str:
    first = peek(files[0])
    row = first[0] if isinstance(first, list) and first else first
    return "official" if isinstance(row, dict) and "Flickr30K_ID" in row else "simple"




def _head(vl: nn.Module, state: State) -> nn.Module:
    H = vl.hidden_size
    return Head(mlp_head(vl, H, 2 * H, 3), on_pooled)


TASK = register_task(Task(
    "ve", "accuracy", {"official": read_ve_official, "simple": read_ve_simple}, _detect_ve,
    head=_head, collate=classify_collate, loss=cross_entropy, metric=classify_accuracy(classify_collate),
    hyper=VEHyper, labels=VE_LABELS,
))  # fmt: skip
