"""Downstream tasks (paper 000 appendix C, 001 appendix A): the registry, and one module per task
with the readers of its official file formats, its head, batches, loss and metric.

A reader turns task files into `Example`s: which image(s), which text, which label. Images are
named as the file names them (a VQA integer id, an NLVR2 identifier, a Flickr30k id); they are
resolved against a dataset's `images/` table later (`raysys.evaluate.downstream.ImageIndex`), so one reader
works with images from `raysys featurize` and from an imported TSV alike.

| task | formats (`format=` / auto-detected) | label |
|---|---|---|
| `vqa` (VQA v2) | `official`: questions JSON (+ annotations JSON); `simple`: JSON(L) rows `{image, question, answers}` | the human answers (10) |
| `nlvr2` | `official`: JSONL (`identifier`, `sentence`, `label` "True"/"False"); `lxmert`: JSON list (`img0`, `img1`, `sent`, `label` 0/1) | 0/1 |
| `ve` (SNLI-VE) | `official`: JSONL (`Flickr30K_ID`, `sentence2`, `gold_label`); `simple`: `{image, hypothesis, label}` | entailment/neutral/contradiction |
| `refcoco` (RefCOCO+) | `refs`: refs(unc) as JSON (the pickle's list of refs) + COCO `instances.json`; `simple`: `{image, expression, box: [x1,y1,x2,y2]}` | the gold box, xyxy pixels |
| `retrieval` | `flickr30k`: Flickr30k Entities split file (ids) + `Sentences/`; `karpathy`: `dataset_*.json` or `[{image_name, captions}]`; `flickr8k`: `captions.tsv` (+ `split.tsv`); `simple`: `{image, caption}` | — |

Every malformed file fails with one `ContractError` line naming the file, the 1-based entry (line
number for JSONL/TSV) and the field.

A new task is one module that builds a `Task` and calls `register_task` (see `registry`); importing
this package registers the five above.
"""

from __future__ import annotations

from raysys.evaluate.tasks import nlvr2, refcoco, retrieval, ve, vqa
from raysys.evaluate.tasks.registry import (
    ALIASES,
    TASKS,
    Encoded,
    Example,
    Reader,
    State,
    Task,
    TaskData,
    TaskHyper,
    get_task,
    read_task,
    register_task,
)
from raysys.evaluate.tasks.retrieval import strip_entities
from raysys.evaluate.tasks.ve import VE_LABELS

__all__ = [
    "ALIASES", "TASKS", "VE_LABELS", "Encoded", "Example", "Reader", "State", "Task", "TaskData", "TaskHyper",
    "get_task", "nlvr2", "read_task", "refcoco", "register_task", "retrieval", "strip_entities", "ve", "vqa",
]  # fmt: skip
