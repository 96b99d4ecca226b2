"""NLVR2 (paper 000 App. C): [sentence, left image] and [sentence, right image] → an MLP on the two
pooled vectors concatenated, 2-way cross-entropy, accuracy.

Formats: `official` — the release's JSONL (`identifier`, `sentence`, `label` "True"/"False");
`lxmert` — a JSON list (`img0`, `img1`, `sent`, `label` 0/1)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raysys.contract import ContractError
from raysys.evaluate.downstream import pair_batch
from raysys.evaluate.tasks.common import Head, class_labels, classify_accuracy, cross_entropy, mlp_head
from raysys.evaluate.tasks.formats import get_field, json_rows, load_jsonl, peek
from raysys.evaluate.tasks.registry import Encoded, Example, State, Task, TaskData, TaskHyper, register_task


@dataclass
class NLVR2Hyper(TaskHyper):
    lr: float = 3e-5  # 000 App. C
    epochs: int = 8
    batch_size: int = 60


# ---------------------------------------------------------------- readers

_NLVR2_ID = re.compile(r"^(?P<pair>.+)-(?P<sent>\d+)$")


def _bool_label(v: Any, path: Path, row: int) -> int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int) and v in (0, 1):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return int(v.strip().lower() == "true")
    raise ContractError(path, row, "label", f"{v!r} is not True/False (or 1/0)")


def read_nlvr2_official(files: list[Path], split: str = "") -> list[Example]:
    """The NLVR2 release's JSONL: `identifier` `split-set-pair-sentence` names the images
    `split-set-pair-img0` / `-img1` (left, right)."""
    out = []
    for p in files:
        for n, r in load_jsonl(p):
            ident = get_field(r, ("identifier",), p, n, str)
            m = _NLVR2_ID.match(ident)
            if not m:
                raise ContractError(p, n, "identifier", f"{ident!r} is not split-set-pair-sentence")
            text = get_field(r, ("sentence",), p, n, str)
            label = _bool_label(get_field(r, ("label",), p, n, (str, bool, int)), p, n)
            pair = m.group("pair")
            out.append(Example(ident, [f"{pair}-img0", f"{pair}-img1"], text, label, [[], []], {"identifier": ident}))
    return out


def read_nlvr2_lxmert(files: list[Path], split: str = "") -> list[Example]:
    """LXMERT/UNITER's processed NLVR2 JSON: `[{identifier, img0, img1, sent, label: 0/1}]`."""
    out = []
    for p in files:
        for n, r in json_rows(p):
            img0 = get_field(r, ("img0",), p, n, str)
            img1 = get_field(r, ("img1",), p, n, str)
            text = get_field(r, ("sent", "sentence"), p, n, str)
            label = _bool_label(get_field(r, ("label",), p, n, (int, str, bool)), p, n)
            uid = str(r.get("identifier") or r.get("uid") or f"{p.stem}:{n}")
            out.append(Example(uid, [img0, img1], text, label, [[], []], {}))
    return out


def _detect_nlvr2(files: list[Path]) -> str:
    first = peek(files[0])
    row = first[0] if isinstance(first, list) and first else first
    if isinstance(row, dict) and "img0" in row:
        return "lxmert"
    return "official"




# ---------------------------------------------------------------- fine-tuning


def _on_pair(net: nn.Module, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
    """Rows 2b, 2b+1 are the same sentence with the left/right image: one row of two vectors."""
    return net(enc.pooled.reshape(-1, 2 * enc.pooled.shape[-1]))


def _head(vl: nn.Module, state: State) -> nn.Module:
    H = vl.hidden_size
    return Head(mlp_head(vl, 2 * H, 2 * H, 2), _on_pair)


def _collate(data: TaskData, idx: np.ndarray, tokenizer, state: State, rng=None) -> dict[str, Any]:
    toks = [data.tokens[int(i)] for i in idx for _ in range(2)]
    imgs = [data.images[int(i)][s] for i in idx for s in range(2)]
    batch = pair_batch(data.imageset, tokenizer, toks, imgs)
    batch["labels"] = class_labels(data, idx)
    return batch


TASK = register_task(Task(
    "nlvr2", "accuracy", {"official": read_nlvr2_official, "lxmert": read_nlvr2_lxmert}, _detect_nlvr2,
    head=_head, collate=_collate, loss=cross_entropy, metric=classify_accuracy(_collate), hyper=NLVR2Hyper,
    labels=("False", "True"), images_per_example=2,
))  # fmt: skip
