"""Image–text retrieval (paper 001 App. A): [caption, image] → the pre-training ITM head,
cross-entropy over each positive and `negatives` sampled mismatched pairs, R@1/5/10 both ways over
the full image × caption ITM scores; headline: the mean of the six recalls.

Formats: `flickr30k` — Flickr30k Entities split file (ids) + `Sentences/`; `karpathy` —
`dataset_*.json` or `[{image_name, captions}]`; `flickr8k` — `captions.tsv` (+ `split.tsv`);
`simple` — `{image, caption}`."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raysys.contract import ContractError
from raysys.evaluate.downstream import pair_batch, score_pairs
from raysys.evaluate.metrics import gold_ranks, rank_summary
from raysys.evaluate.tasks.common import Head, cross_entropy, per_item, single_image_batch
from raysys.evaluate.tasks.formats import get_field, json_rows, load_json, peek, split_ok
from raysys.evaluate.tasks.registry import Encoded, Example, State, Task, TaskData, TaskHyper, register_task


@dataclass
class RetrievalHyper(TaskHyper):
    lr: float = 5e-5  # 001 App. A (Flickr30K)
    epochs: int = 0
    steps: int = 5000
    batch_size: int = 8  # positives per batch; each brings `negatives` mismatched pairs
    negatives: int = 2  # UNITER: two sampled negatives per positive (half wrong image, half wrong caption)
    eval_max_images: int = 0  # 0 = every eval image (full I × T ITM scoring)


# ---------------------------------------------------------------- readers

_ENTITY = re.compile(r"\[/EN#\d+/[^\s\]]+\s+([^\]]*)\]")


def strip_entities(sentence: str) -> str:
    """Flickr30k Entities markup → plain text: `[/EN#1/people A girl] sits` → `A girl sits`."""
    return re.sub(r"\s+", " ", _ENTITY.sub(r"\1", sentence)).strip()


def read_retrieval_flickr30k(files: list[Path], split: str = "") -> list[Example]:
    """Flickr30k Entities: a split file of image ids (`train.txt`, `test.txt`, …) whose sentences
    are in `Sentences/<id>.txt` (or `sentences/`) beside it; one example per caption."""
    out = []
    for p in files:
        sdir = next((p.parent / d for d in ("Sentences", "sentences") if (p.parent / d).is_dir()), None)
        if sdir is None:
            raise ContractError(p, None, "Sentences", f"no Sentences/ folder beside {p.name}")
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            img = line.strip()
            if not img:
                continue
            sf = sdir / f"{img}.txt"
            if not sf.is_file():
                raise ContractError(p, n, "image_id", f"no sentence file {sf}")
            for k, s in enumerate(sf.read_text(encoding="utf-8").splitlines(), start=1):
                if s.strip():
                    text = strip_entities(s)
                    if not text:
                        raise ContractError(sf, k, "sentence", "empty after removing the entity markup")
                    out.append(Example(f"{img}#{k - 1}", [img], text, None, [[f"{img}.jpg"]], {}))
    return out


def read_retrieval_karpathy(files: list[Path], split: str = "") -> list[Example]:
    """Karpathy `dataset_{coco,flickr8k,flickr30k}.json` (`images: [{filename, split, sentences:
    [{raw}]}]`) or `[{image_name, captions: [...]}]`."""
    out = []
    for p in files:
        d = load_json(p)
        entries = d["images"] if isinstance(d, dict) and "images" in d else d
        if not isinstance(entries, list):
            raise ContractError(p, None, "images", "expected a list of images")
        for n, e in enumerate(entries, start=1):
            if not isinstance(e, dict):
                raise ContractError(p, n, "images", "expected an object")
            if not split_ok(e.get("split", ""), split):
                continue
            img = get_field(e, ("filename", "image_name", "image"), p, n, (str, int))
            if "sentences" in e:
                caps = [s.get("raw") if isinstance(s, dict) else s for s in get_field(e, ("sentences",), p, n, list)]
            else:
                caps = get_field(e, ("captions",), p, n, list)
            for k, c in enumerate(caps):
                if not isinstance(c, str) or not c.strip():
                    raise ContractError(p, n, "sentences", f"caption {k} is not a non-empty string")
                out.append(Example(f"{img}#{k}", [str(img)], c.strip(), None, [[]], {}))
    return out


def read_retrieval_flickr8k(files: list[Path], split: str = "") -> list[Example]:
    """Flickr8k `captions.tsv` (image, caption_index, caption; header) and, for `split`, the
    `split.tsv` beside it."""
    out = []
    for p in files:
        splits: dict[str, str] = {}
        sf = p.with_name("split.tsv")
        if split:
            if not sf.is_file():
                raise ContractError(p, None, "split", f"split {split!r} asked for but no split.tsv beside {p.name}")
            with open(sf, encoding="utf-8", newline="") as f:
                for row in list(csv.reader(f, delimiter="\t"))[1:]:
                    if len(row) >= 2:
                        splits[row[0]] = row[1].strip()
        with open(p, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
                if n == 1 and row[:1] == ["image"]:
                    continue
                if len(row) < 3:
                    raise ContractError(p, n, "caption", f"expected 3 tab-separated fields, got {len(row)}")
                if split and splits.get(row[0]) != split:
                    continue
                if not row[2].strip():
                    raise ContractError(p, n, "caption", "empty")
                out.append(Example(f"{row[0]}#{row[1]}", [row[0]], row[2].strip(), None, [[]], {}))
    return out


def read_retrieval_simple(files: list[Path], split: str = "") -> list[Example]:
    out = []
    for p in files:
        for n, r in json_rows(p):
            if not split_ok(r.get("split", ""), split):
                continue
            img = get_field(r, ("image", "image_id"), p, n, (str, int))
            text = get_field(r, ("caption", "text", "sentence"), p, n, str)
            out.append(Example(str(r.get("id", f"{p.stem}:{n}")), [str(img)], text, None, [[]], {}))
    return out


def _detect_retrieval(files: list[Path]) -> str:
    p = files[0]
    if p.suffix == ".tsv":
        return "flickr8k"
    if p.suffix == ".txt":
        return "flickr30k"
    first = peek(p)
    if isinstance(first, dict) and "images" in first:
        return "karpathy"
    row = first[0] if isinstance(first, list) and first else first
    if isinstance(row, dict) and ("captions" in row or "sentences" in row):
        return "karpathy"
    return "simple"




# ---------------------------------------------------------------- fine-tuning


def _setup(hp: RetrievalHyper, train: TaskData) -> State:
    caps: dict[int, set[int]] = {}
    for i, r in enumerate(train.images):
        caps.setdefault(r[0], set()).add(i)
    return {"captions_of_image": caps, "negatives": hp.negatives, "eval_max_images": hp.eval_max_images}


def _on_itm(net: nn.Module, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
    """No new layers: the pre-training ITM head scores the pair."""
    return enc.vl.itm_head(enc.pooled)


def _head(vl: nn.Module, state: State) -> nn.Module:
    return Head(nn.Identity(), _on_itm)


def _collate(data: TaskData, idx: np.ndarray, tokenizer, state: State, rng=None) -> dict[str, Any]:
    """Training (`rng` given): each positive and `negatives` sampled mismatches, alternately a wrong
    image and a wrong caption (any caption not of this image). Evaluation: the pairs as they are."""
    if rng is None:
        return single_image_batch(data, idx, tokenizer)
    toks, imgs, labels = [], [], []
    n_img = data.imageset.n_images
    caps_of = state["captions_of_image"]
    all_caps = len(data.examples)
    for i in idx:
        i = int(i)
        img = data.images[i][0]
        toks.append(data.tokens[i])
        imgs.append(img)
        labels.append(1)
        for k in range(state["negatives"]):
            if k % 2 == 0 and n_img > 1:  # wrong image
                other = int(rng.integers(0, n_img - 1))
                toks.append(data.tokens[i])
                imgs.append(other + (other >= img))
            else:  # wrong caption
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


def _metric(model: nn.Module, data: TaskData, tokenizer, state: State, batch_size: int, device,
            tie_policy: str = "pessimistic") -> dict[str, Any]:  # fmt: skip
    """ITM scores of every (eval image, eval caption) pair (or of a seeded sample of
    `eval_max_images` images with their captions), ranked both ways."""
    n = len(data.examples)
    img_of = np.array([data.images[i][0] for i in range(n)], np.int64)
    images = np.unique(img_of)
    if state.get("eval_max_images") and state["eval_max_images"] < len(images):
        images = np.sort(np.random.default_rng(0).choice(images, state["eval_max_images"], replace=False))
    texts = np.flatnonzero(np.isin(img_of, images))
    pi, pt = np.meshgrid(images, texts, indexing="ij")
    with torch.inference_mode():
        s = score_pairs(model.vl, data.imageset, tokenizer, data.tokens, pi.ravel(), pt.ravel(), batch_size, device)
    S = s.reshape(len(images), len(texts))
    gold = img_of[texts][None, :] == images[:, None]
    out: dict[str, Any] = {}
    out.update(rank_summary(gold_ranks(S, gold, tie_policy), "i2t"))
    out.update(rank_summary(gold_ranks(S.T, gold.T, tie_policy), "t2i"))
    out["r_mean"] = float(np.mean([out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]))
    out.update(n_images=len(images), n_texts=len(texts))
    out["chance_r_mean"] = chance_r_mean(img_of[texts], images)
    out["per_item"] = _per_image(data, images, img_of[texts], gold_ranks(S, gold, tie_policy),
                                 gold_ranks(S.T, gold.T, tie_policy))  # fmt: skip
    return out


def chance_r_mean(text_img: np.ndarray, images: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> float:
    """What a random ranking scores, in expectation, on the per-image items of `_per_image`: an image
    with c of the T captions finds one in its top k with 1 - C(T-c, k)/C(T, k); a caption finds its one
    image among n with k/n. Why: the chance of R-mean depends on the evaluation size (5.3 % for 100
    Flickr8k photos with 5 captions each, 12.9 % for 40), so the report draws it from what was scored."""
    T, n = len(text_img), len(images)
    t2i = float(np.mean([min(k, n) / n for k in ks]))
    scores = []
    for img in images:
        c = int((text_img == img).sum())
        miss = [float(np.prod((T - c - np.arange(min(k, T))) / (T - np.arange(min(k, T))))) for k in ks]
        scores.append(50.0 * (1.0 - float(np.mean(miss)) + t2i))
    return float(np.mean(scores)) if scores else float("nan")


def _per_image(data: TaskData, images: np.ndarray, text_img: np.ndarray, i2t: np.ndarray, t2i: np.ndarray) -> dict:
    """One item per evaluation image: the mean of its own i2t recalls@1/5/10 and of its captions'
    t2i recalls (percent). Their mean is `r_mean` when every image has the same number of captions."""
    h_i, h_t = (np.mean([ranks <= k for k in (1, 5, 10)], axis=0) for ranks in (i2t, t2i))
    scores = [50.0 * (h_i[a] + h_t[text_img == img].mean()) for a, img in enumerate(images)]
    first = {}
    for i, ex in enumerate(data.examples):
        first.setdefault(data.images[i][0], ex.images[0])
    return per_item(data, scores, ids=[str(first[int(img)]) for img in images])


TASK = register_task(Task(
    "retrieval", "r_mean", {"flickr30k": read_retrieval_flickr30k, "karpathy": read_retrieval_karpathy,
                            "flickr8k": read_retrieval_flickr8k, "simple": read_retrieval_simple},
    _detect_retrieval, head=_head, collate=_collate, loss=cross_entropy, metric=_metric, hyper=RetrievalHyper,
    setup=_setup,
))  # fmt: skip
