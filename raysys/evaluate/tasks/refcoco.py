"""RefCOCO+ (paper 000 App. C): [expression, image regions] → an MLP on every region's output (a
score per region), BCE per region (a region whose IoU with the gold box is over `iou_threshold`
is a positive), accuracy: IoU(best-scored region, gold box) > `iou_threshold`.

Formats: `refs` — refs(unc) as JSON (the pickle's list of refs) + COCO `instances.json`;
`simple` — `{image, expression, box: [x1, y1, x2, y2]}`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysys.contract import ContractError
from raysys.evaluate.metrics import iou, xywh_to_xyxy
from raysys.evaluate.tasks.common import Head, mlp_head, per_item, predict, single_image_batch
from raysys.evaluate.tasks.formats import get_field, json_rows, load_json, peek, split_ok
from raysys.evaluate.tasks.registry import Encoded, Example, State, Task, TaskData, TaskHyper, register_task


@dataclass
class RefCOCOHyper(TaskHyper):
    lr: float = 2e-4  # 000 App. C
    epochs: int = 20
    batch_size: int = 32  # 001 App. A (000 does not say)
    iou_threshold: float = 0.5  # a region is correct when IoU with the gold box > this
    train_split: str = "train"  # RefCOCO+ (unc) splits: train, val, testA, testB
    eval_split: str = "val"


# ---------------------------------------------------------------- readers


def _box(v: Any, path: Path, row: int, fieldname: str) -> list[float]:
    if not isinstance(v, list) or len(v) != 4 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ContractError(path, row, fieldname, f"expected 4 numbers, got {v!r:.60}")
    return [float(x) for x in v]


def read_refcoco_refs(files: list[Path], split: str = "") -> list[Example]:
    """The refs(unc) layout, as JSON (the list stored in `refs(unc).p`) + COCO `instances.json`.

    Each ref `{ref_id, ann_id, image_id, split, sentences: [{sent, sent_id}]}` gives one example
    per sentence; the gold box is the annotation `ann_id`'s `bbox` ([x, y, w, h] → xyxy)."""

    refs_file = inst_file = None
    for p in files:
        d = load_json(p)
        if isinstance(d, list):
            refs_file, refs = p, d
        elif isinstance(d, dict) and "annotations" in d:
            inst_file, inst = p, d
        elif isinstance(d, dict) and "refs" in d:
            refs_file, refs = p, d["refs"]
        else:
            raise ContractError(p, None, "json", "neither a refs list nor a COCO instances file (with 'annotations')")
    if refs_file is None or inst_file is None:
        raise ContractError(files[0], None, "files", "the refs format needs two files: refs JSON + instances.json")
    boxes: dict[int, list[float]] = {}
    sizes: dict[int, tuple[int, int]] = {}
    for n, a in enumerate(inst["annotations"], start=1):
        if not isinstance(a, dict):
            raise ContractError(inst_file, n, "annotations", "expected an object")
        boxes[get_field(a, ("id",), inst_file, n, int)] = xywh_to_xyxy(_box(a.get("bbox"), inst_file, n, "bbox"))
    for im in inst.get("images", []):
        if isinstance(im, dict) and "id" in im:
            sizes[im["id"]] = (im.get("width"), im.get("height"))
    out = []
    for n, r in enumerate(refs, start=1):
        if not isinstance(r, dict):
            raise ContractError(refs_file, n, "refs", "expected an object")
        if not split_ok(r.get("split", ""), split):
            continue
        ann = get_field(r, ("ann_id",), refs_file, n, int)
        img = get_field(r, ("image_id",), refs_file, n, int)
        if ann not in boxes:
            raise ContractError(refs_file, n, "ann_id", f"annotation {ann} is not in {inst_file.name}")
        sents = get_field(r, ("sentences",), refs_file, n, list)
        for s in sents:
            if not isinstance(s, dict) or not isinstance(s.get("sent"), str) or not s["sent"].strip():
                raise ContractError(refs_file, n, "sentences", "each sentence must be an object with a non-empty 'sent'")
            prefer = [str(r["file_name"])] if isinstance(r.get("file_name"), str) else []
            prefer += [f"COCO_train2014_{img:012d}"]
            uid = f"{r.get('ref_id', n)}:{s.get('sent_id', len(out))}"
            out.append(Example(uid, [str(img)], s["sent"], boxes[ann], [prefer],
                               {"ref_id": r.get("ref_id"), "split": r.get("split"), "image_size": sizes.get(img)}))  # fmt: skip
    return out


def read_refcoco_simple(files: list[Path], split: str = "") -> list[Example]:
    """JSON list / JSONL rows `{image, expression, box: [x1, y1, x2, y2]}` (pixels; `bbox_xywh`
    accepted instead of `box`)."""

    out = []
    for p in files:
        for n, r in json_rows(p):
            if not split_ok(r.get("split", ""), split):
                continue
            img = get_field(r, ("image", "image_id"), p, n, (str, int))
            text = get_field(r, ("expression", "sentence", "sent"), p, n, str)
            if "box" in r:
                box = _box(r["box"], p, n, "box")
                if box[2] < box[0] or box[3] < box[1]:
                    raise ContractError(p, n, "box", f"{box} is not x1 <= x2, y1 <= y2")
            elif "bbox_xywh" in r:
                box = xywh_to_xyxy(_box(r["bbox_xywh"], p, n, "bbox_xywh"))
            else:
                raise ContractError(p, n, "box", "missing (also looked for bbox_xywh)")
            out.append(Example(str(r.get("id", f"{p.stem}:{n}")), [str(img)], text, box, [[]], {}))
    return out


def _detect_refcoco(files: list[Path]) -> str:
    for p in files:
        first = peek(p)
        row = first[0] if isinstance(first, list) and first else first
        if isinstance(row, dict) and ("annotations" in row or {"ann_id", "sentences"} <= set(row)):
            return "refs"
    return "simple"




# ---------------------------------------------------------------- fine-tuning


def _on_regions(net: nn.Module, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
    """A score per region; padding regions can never be the best."""
    logits = net(enc.regions).squeeze(-1)
    return logits.masked_fill(~batch["region_mask"], float("-inf"))


def _head(vl: nn.Module, state: State) -> nn.Module:
    H = vl.hidden_size
    return Head(mlp_head(vl, H, H, 1), _on_regions)


def _collate(data: TaskData, idx: np.ndarray, tokenizer, state: State, rng=None) -> dict[str, Any]:
    batch = single_image_batch(data, idx, tokenizer)
    R = batch["region_mask"].shape[1]
    target = np.zeros((len(idx), R), np.float32)
    for b, i in enumerate(idx):
        boxes = data.imageset.image_boxes(data.images[int(i)][0])
        target[b, : len(boxes)] = iou(boxes, data.examples[int(i)].label) > state["iou_threshold"]
    batch["labels"] = torch.from_numpy(target)
    return batch


def _loss(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Mean BCE over the real regions of the batch."""
    labels = batch["labels"].to(logits.device)
    mask = batch["region_mask"].to(logits.device)
    safe = logits.masked_fill(~mask, 0.0)
    per = F.binary_cross_entropy_with_logits(safe, labels, reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1)


def _metric(model: nn.Module, data: TaskData, tokenizer, state: State, batch_size: int, device) -> dict[str, Any]:
    """Accuracy, and the share of examples where some proposal is a hit: what the detector allows."""
    preds = []
    for idx, logits in predict(model, data, tokenizer, state, batch_size, device, _collate):
        for i, r in zip(idx, logits.argmax(dim=1).numpy()):
            preds.append(data.imageset.image_boxes(data.images[int(i)][0])[int(r)])
    thr = state["iou_threshold"]
    hits = [iou(p, ex.label) > thr for p, ex in zip(preds, data.examples)]
    upper = [bool((iou(data.imageset.image_boxes(data.images[i][0]), ex.label) > thr).any())
             for i, ex in enumerate(data.examples)]  # fmt: skip
    n = len(data.examples)
    return {"accuracy": 100.0 * float(np.mean(hits)), "n_eval": n, "proposal_upper_bound": 100.0 * float(np.mean(upper)),
            "per_item": per_item(data, 100.0 * np.asarray(hits, np.float64))}  # fmt: skip


TASK = register_task(Task(
    "refcoco", "accuracy", {"refs": read_refcoco_refs, "simple": read_refcoco_simple}, _detect_refcoco,
    head=_head, collate=_collate, loss=_loss, metric=_metric, hyper=RefCOCOHyper,
    setup=lambda hp, train: {"iou_threshold": hp.iou_threshold},
))  # fmt: skip
