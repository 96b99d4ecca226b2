"""VQA v2 (paper 000 App. C): [question, image] → an MLP on the pooled vector over the answer
vocabulary (the 3,129 most frequent training answers by default), BCE on soft scores (each
answer's own VQA accuracy: 0.3/0.6/0.9/1, scaled by the vocabulary size as UNITER does), the
official VQA accuracy.

Formats: `official` — questions JSON (+ annotations JSON); `simple` — JSON(L) rows
`{image, question, answers}`."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysys.config import ConfigError
from raysys.contract import ContractError
from raysys.evaluate.metrics import normalize_answer, vqa_accuracy, vqa_soft_scores
from raysys.evaluate.tasks.common import (
    Head,
    argmax_predictions,
    mlp_head,
    on_pooled,
    per_item,
    single_image_batch,
)
from raysys.evaluate.tasks.formats import get_field, json_rows, load_json, peek, split_ok
from raysys.evaluate.tasks.registry import Example, State, Task, TaskData, TaskHyper, register_task


@dataclass
class VQAHyper(TaskHyper):
    lr: float = 6e-5  # 000 App. C
    epochs: int = 20
    batch_size: int = 480
    num_answers: int = 3129  # the most frequent training answers (000 App. C, following BUTD)
    answer_vocab: str = ""  # a fixed vocabulary file (JSON list, ans2label dict, or one per line)


# ---------------------------------------------------------------- readers



def read_vqa_official(files: list[Path], split: str = "") -> list[Example]:
    """VQA v2 `v2_OpenEnded_mscoco_*_questions.json` (+ `v2_mscoco_*_annotations.json`), any order.

    Without an annotations file the examples carry no answers (prediction only). Images are
    `COCO_<data_subtype>_<12-digit id>` (tried first) or the bare integer id."""
    qfile = afile = None
    for p in files:
        d = load_json(p)
        if not isinstance(d, dict):
            raise ContractError(p, None, "json", "expected a JSON object with 'questions' or 'annotations'")
        if "questions" in d:
            qfile, qdata = p, d
        elif "annotations" in d:
            afile, adata = p, d
        else:
            raise ContractError(p, None, "questions", "neither 'questions' nor 'annotations' at the top level")
    if qfile is None:
        raise ContractError(files[0], None, "questions", "VQA needs the questions file (with a 'questions' list)")
    subtype = str(qdata.get("data_subtype") or "")
    answers: dict[int, tuple[list[str], dict]] = {}
    if afile is not None:
        if not isinstance(adata["annotations"], list):
            raise ContractError(afile, None, "annotations", "expected a list")
        for n, a in enumerate(adata["annotations"], start=1):
            if not isinstance(a, dict):
                raise ContractError(afile, n, "annotations", "expected an object")
            qid = get_field(a, ("question_id",), afile, n, int)
            ans = get_field(a, ("answers",), afile, n, list)
            if not ans:
                raise ContractError(afile, n, "answers", "empty list")
            texts = []
            for x in ans:
                if not isinstance(x, dict) or not isinstance(x.get("answer"), str):
                    raise ContractError(afile, n, "answers", "each answer must be an object with a string 'answer'")
                texts.append(x["answer"])
            meta = {k: a[k] for k in ("answer_type", "question_type", "multiple_choice_answer") if k in a}
            answers[qid] = (texts, meta)
    if not isinstance(qdata["questions"], list):
        raise ContractError(qfile, None, "questions", "expected a list")
    out = []
    for n, q in enumerate(qdata["questions"], start=1):
        if not isinstance(q, dict):
            raise ContractError(qfile, n, "questions", "expected an object")
        qid = get_field(q, ("question_id",), qfile, n, int)
        img = get_field(q, ("image_id",), qfile, n, int)
        text = get_field(q, ("question",), qfile, n, str)
        if afile is not None and qid not in answers:
            raise ContractError(afile, None, "question_id", f"no annotation for question {qid} ({qfile.name} entry {n})")
        label, meta = answers.get(qid, (None, {}))
        prefer = [f"COCO_{subtype}_{img:012d}"] if subtype else []
        out.append(Example(str(qid), [str(img)], text, label, [prefer], {"question_id": qid, "image_id": img, **meta}))
    return out


def read_vqa_simple(files: list[Path], split: str = "") -> list[Example]:
    """JSON list / JSONL rows `{image, question, answers: [..]}` (`image_id`/`img_id`, `sent` accepted)."""
    out = []
    for p in files:
        for n, r in json_rows(p):
            if not split_ok(r.get("split", ""), split):
                continue
            img = get_field(r, ("image", "image_id", "img_id"), p, n, (str, int))
            text = get_field(r, ("question", "sent"), p, n, str)
            ans = r.get("answers")
            if ans is not None and (not isinstance(ans, list) or not ans or not all(isinstance(a, str) for a in ans)):
                raise ContractError(p, n, "answers", "expected a non-empty list of strings")
            uid = str(r.get("question_id", f"{p.stem}:{n}"))
            out.append(Example(uid, [str(img)], text, ans, [[]], {}))
    return out


def _detect_vqa(files: list[Path]) -> str:
    first = peek(files[0])
    if isinstance(first, dict) and not ({"question", "sent"} & set(first)):
        return "official"  # a JSON document (questions / annotations), not a row of the simple layout
    return "simple"




def _check(examples: list[Example]) -> None:
    if any(ex.label is None for ex in examples):
        raise ConfigError("vqa: train and eval need the annotations file next to the questions file")


# ---------------------------------------------------------------- fine-tuning


def build_answer_vocab(train: list[Any], hp: VQAHyper) -> list[str]:
    """The fixed vocabulary file, else the `num_answers` most frequent (normalised) human answers
    of the training data (ties alphabetical, so the vocabulary is deterministic)."""
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


def _setup(hp: VQAHyper, train: TaskData) -> State:
    vocab = build_answer_vocab(train.examples, hp)
    return {"vocab": vocab, "vocab_index": {a: i for i, a in enumerate(vocab)}}


def _head(vl: nn.Module, state: State) -> nn.Module:
    H = vl.hidden_size
    return Head(mlp_head(vl, H, 2 * H, len(state["vocab"])), on_pooled)


def _collate(data: TaskData, idx: np.ndarray, tokenizer, state: State, rng=None) -> dict[str, Any]:
    """Targets are the soft scores of the vocabulary's answers."""
    batch = single_image_batch(data, idx, tokenizer)
    vocab_index = state["vocab_index"]
    target = np.zeros((len(idx), len(vocab_index)), np.float32)
    for b, i in enumerate(idx):
        for a, s in vqa_soft_scores(data.examples[int(i)].label or []).items():
            if a in vocab_index:
                target[b, vocab_index[a]] = s
    batch["labels"] = torch.from_numpy(target)
    return batch


def _loss(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """UNITER scales the mean BCE by the vocabulary size (a sum over answers)."""
    labels = batch["labels"].to(logits.device)
    return F.binary_cross_entropy_with_logits(logits, labels) * labels.shape[1]


def _candidates(answers: list[str], vocab_index: dict[str, int]) -> list[str]:
    return [a for a in {normalize_answer(x) for x in answers} if a in vocab_index]


def _metric(model: nn.Module, data: TaskData, tokenizer, state: State, batch_size: int, device) -> dict[str, Any]:
    """VQA accuracy, and the best any prediction from this vocabulary could score: how much the
    vocabulary costs."""
    preds = argmax_predictions(model, data, tokenizer, state, batch_size, device, _collate)
    vocab = state["vocab"]
    accs = [vqa_accuracy(vocab[p], ex.label) for p, ex in zip(preds, data.examples)]
    upper = [max((vqa_accuracy(a, ex.label) for a in _candidates(ex.label, state["vocab_index"])), default=0.0)
             for ex in data.examples]  # fmt: skip
    n = len(data.examples)
    return {"vqa_accuracy": 100.0 * float(np.mean(accs)), "n_eval": n, "vocab_upper_bound": 100.0 * float(np.mean(upper)),
            "per_item": per_item(data, 100.0 * np.asarray(accs))}  # fmt: skip


TASK = register_task(Task(
    "vqa", "vqa_accuracy", {"official": read_vqa_official, "simple": read_vqa_simple}, _detect_vqa,
    head=_head, collate=_collate, loss=_loss, metric=_metric, hyper=VQAHyper, setup=_setup, check=_check,
    report=lambda state: {"num_answers": len(state["vocab"])},
))  # fmt: skip
