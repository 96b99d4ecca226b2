"""A two-stage checkpoint's uni-modal towers as an encoder: for `coarse=towers` zero-shot ranking,
and as retrieval's encoder for a second round of corpus building (`raysys retrieve --encoder CKPT`).

The second use closes the loop the weakly aligned corpus opens: the model pre-trained on the
first round's retrieved pairs embeds every image (its regions, plus its detector tags as tag
concepts when the model was trained with MCR) and every text with its towers, and the same
sharded index searches them. The embeddings keep the stage's layout (`embeddings/{images,texts}/`,
one shard per input shard, written atomically and resumed per shard), under the model id
`towers:<sha256 of the checkpoint>`: a different checkpoint, or the sentence encoder again,
recomputes them and the pairs made from them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from raysys.config import ConfigError
from raysys.contract import shard_name, write_parquet_atomic
from raysys.corpus.embedding import fingerprint, input_files, reset_if_stale, vectors_table
from raysys.evaluate.downstream import load_images, pair_batch, pick_device, text_settings, tokenize
from raysys.pretrain.granularities import to_device
from raysys.pretrain.model import load_checkpoint, load_tokenizer

log = logging.getLogger(__name__)


def image_tag_ids(corpus, tokenizer, with_tags: bool) -> torch.Tensor | None:
    """(I, G, L) sub-word ids of each image's distinct detector tags (the visual tower's tag
    concepts, as the `mvptr` granularity builds them), IGNORE-padded; None without tags."""
    if not with_tags:
        return None
    rows = []
    for i in range(corpus.n_images):
        sl = corpus.regions(i)
        seen: dict[int, str] = {}
        for c, t in zip(corpus.class_ids[sl].tolist(), corpus.tags[sl]):
            if c >= 0:
                seen.setdefault(c, t)
        rows.append([tokenizer(t, add_special_tokens=False)["input_ids"] for t in seen.values()])
    G = max((len(r) for r in rows), default=0)
    L = max((len(x) for r in rows for x in r), default=1)
    out = torch.full((len(rows), G, L), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        for j, x in enumerate(r):
            out[i, j, : len(x)] = torch.tensor(x)
    return out


def embed_tower_images(model, corpus, tokenizer, batch_size: int, device) -> np.ndarray:
    """(I, H) unit-norm image-tower embeddings of every image of `corpus`, in its order."""
    tags = image_tag_ids(corpus, tokenizer, "mcr" in model.cfg.objectives)
    empty = np.zeros(0, np.int64)
    out = [np.zeros((0, model.hidden_size), np.float32)]
    with torch.inference_mode():
        for lo in range(0, corpus.n_images, batch_size):
            idx = list(range(lo, min(lo + batch_size, corpus.n_images)))
            batch = pair_batch(corpus, tokenizer, [empty] * len(idx), idx)
            if tags is not None:
                batch["vtag_ids"] = tags[idx]
            out.append(model.image_embedding(to_device(batch, device)).cpu().numpy())
    return np.concatenate(out)


def embed_tower_texts(model, corpus, tokenizer, tokens: list[np.ndarray], batch_size: int, device) -> np.ndarray:
    """(T, H) unit-norm text-tower embeddings of `tokens` (ids without [CLS]/[SEP]), shortest first
    in batches (less padding), returned in the input order."""
    out = np.zeros((len(tokens), model.hidden_size), np.float32)
    order = np.argsort([len(t) for t in tokens], kind="stable")
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            batch = pair_batch(corpus, tokenizer, [tokens[int(i)] for i in idx], [None] * len(idx))
            out[idx] = model.text_embedding(to_device(batch, device)).cpu().numpy()
    return out


def checkpoint_id(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"towers:{h.hexdigest()[:16]}"


class TowerEncoder:
    """Retrieval's encoder from a two-stage checkpoint (`raysys.corpus.retrieval.retrieve(...,
    encoder=TowerEncoder(ckpt))`): `model_id` names the embeddings; calling it writes them."""

    def __init__(self, checkpoint: str | Path, batch_size: int = 64, device: str = "auto"):
        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_file():
            raise ConfigError(f"--encoder {checkpoint}: no such checkpoint file")
        self.batch_size, self.device = batch_size, device
        self.model_id = checkpoint_id(self.checkpoint)

    def _load(self):
        model, extra = load_checkpoint(self.checkpoint)
        if model.cfg.encoder != "two_stage":
            raise ConfigError(f"--encoder {self.checkpoint.name}: a single-stream checkpoint has no towers; use a "
                              "model.encoder=two_stage one (recipes mvptr, muvla+vsc)")  # fmt: skip
        return model.eval(), extra

    def __call__(self, data: str | Path, on_shard: Callable[[Path], None] | None = None) -> dict[str, Any]:
        """Embed the pending image and text shards of `data`; the report `embed` gives."""
        data = Path(data)
        model, extra = self._load()
        device = pick_device(self.device)
        model.to(device)
        tokenizer = load_tokenizer(model.cfg.model_path)
        max_text_len, max_regions = text_settings(extra)
        report: dict[str, Any] = {}
        for table in ("images", "texts"):
            files = input_files(data, table)
            out_dir = data / "embeddings" / table
            reset_if_stale(out_dir, {"table": table, "model": self.model_id, "inputs": fingerprint(files)})
            computed = rows = 0
            for i, f in enumerate(files):
                path = out_dir / shard_name(i)
                if not path.exists():
                    if table == "images":
                        ids = pq.read_table(f, columns=["image_id"]).column(0).to_pylist()
                        vecs = embed_tower_images(model, load_images(data, ids, max_regions), tokenizer,
                                                  self.batch_size, device)  # fmt: skip
                    else:
                        t = pq.read_table(f, columns=["text_id", "text"])
                        ids = t.column(0).to_pylist()
                        tokens = tokenize(tokenizer, t.column(1).to_pylist(), max_text_len)
                        vecs = embed_tower_texts(model, load_images(data, [], max_regions), tokenizer, tokens,
                                                 self.batch_size, device)  # fmt: skip
                    write_parquet_atomic(vectors_table(ids, vecs), path)
                    computed += 1
                    log.info("towers: embedded %s shard %d/%d (%d rows)", table, i + 1, len(files), len(ids))
                    if on_shard is not None:
                        on_shard(path)
                rows += pq.read_metadata(path).num_rows
            report[table] = {"shards": len(files), "computed": computed, "rows": rows, "dim": model.hidden_size,
                             "encoder": self.model_id}  # fmt: skip
        return report
